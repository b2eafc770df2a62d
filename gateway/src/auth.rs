//! Handshake authentication: JWT verification (pure, no I/O) and the channel
//! permissions a token grants.

use std::sync::Arc;

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

/// Longest token accepted, in bytes.
pub const MAX_TOKEN_BYTES: usize = 8192;

/// Why a token was refused; each maps to a 401 with this text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("missing token")]
    Missing,
    #[error("token too large")]
    TooLarge,
    #[error("malformed token")]
    Malformed,
    #[error("algorithm not allowed")]
    Algorithm,
    #[error("bad signature")]
    Signature,
    #[error("token expired")]
    Expired,
    #[error("token not yet valid")]
    NotYetValid,
    #[error("wrong issuer")]
    Issuer,
    #[error("missing issuer (iss claim required)")]
    MissingIssuer,
    #[error("wrong audience")]
    Audience,
    #[error("missing audience (aud claim required)")]
    MissingAudience,
    #[error("invalid subject")]
    Subject,
}

impl AuthError {
    /// Every reason, for registering metrics.
    pub const ALL: [AuthError; 12] = [
        Self::Missing,
        Self::TooLarge,
        Self::Malformed,
        Self::Algorithm,
        Self::Signature,
        Self::Expired,
        Self::NotYetValid,
        Self::Issuer,
        Self::MissingIssuer,
        Self::Audience,
        Self::MissingAudience,
        Self::Subject,
    ];

    /// Closed label for metrics.
    pub fn label(self) -> &'static str {
        match self {
            Self::Missing => "missing_token",
            Self::TooLarge => "token_too_large",
            Self::Malformed => "malformed_token",
            Self::Algorithm => "bad_algorithm",
            Self::Signature => "bad_signature",
            Self::Expired => "token_expired",
            Self::NotYetValid => "token_not_yet_valid",
            Self::Issuer => "wrong_issuer",
            Self::MissingIssuer => "missing_issuer",
            Self::Audience => "wrong_audience",
            Self::MissingAudience => "missing_audience",
            Self::Subject => "invalid_subject",
        }
    }
}

/// Who a session belongs to and what it may touch.
#[derive(Debug, Clone)]
pub struct Identity {
    pub user: Arc<str>,
    /// Channel patterns the user may use; `None` allows all.
    pub channels: Option<Arc<[String]>>,
    /// Token expiry, unix seconds.
    pub expires_at: Option<u64>,
}

impl Identity {
    /// Whether this identity may subscribe to / publish on `channel`.
    pub fn may_use(&self, channel: &str) -> bool {
        match &self.channels {
            None => true,
            Some(patterns) => patterns.iter().any(|p| glob_match(p, channel)),
        }
    }
}

#[derive(Debug, Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
    #[serde(default)]
    channels: Option<Vec<String>>,
    /// Only whether they are present (jsonwebtoken checks their values).
    #[serde(default)]
    iss: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    aud: Option<serde::de::IgnoredAny>,
}

/// Verifies client JWTs against the configured keys.
#[derive(Clone)]
pub struct Verifier {
    keys: Vec<(Algorithm, DecodingKey)>,
    issuer: Option<String>,
    audience: Option<String>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let algs: Vec<_> = self.keys.iter().map(|(a, _)| *a).collect();
        f.debug_struct("Verifier")
            .field("algorithms", &algs)
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .finish()
    }
}

impl Verifier {
    /// A verifier with no keys: refuses every token.
    pub fn new(issuer: Option<String>, audience: Option<String>) -> Self {
        Self { keys: Vec::new(), issuer, audience }
    }

    /// Accepts HS256 tokens signed with `secret`.
    pub fn with_hs256(mut self, secret: &[u8]) -> Result<Self, jsonwebtoken::errors::Error> {
        self.keys.push((Algorithm::HS256, DecodingKey::from_secret(secret)?));
        Ok(self)
    }

    /// Accepts RS256 tokens verified with this PEM public key.
    pub fn with_rs256_pem(mut self, pem: &[u8]) -> Result<Self, jsonwebtoken::errors::Error> {
        self.keys.push((Algorithm::RS256, DecodingKey::from_rsa_pem(pem)?));
        Ok(self)
    }

    /// Accepts EdDSA (Ed25519) tokens verified with this PEM public key.
    pub fn with_eddsa_pem(mut self, pem: &[u8]) -> Result<Self, jsonwebtoken::errors::Error> {
        self.keys.push((Algorithm::EdDSA, DecodingKey::from_ed_pem(pem)?));
        Ok(self)
    }

    /// Whether any key is configured.
    pub fn has_keys(&self) -> bool {
        !self.keys.is_empty()
    }

    /// Checks a token and returns the identity it proves.
    pub fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(AuthError::TooLarge);
        }
        let header = jsonwebtoken::decode_header(token).map_err(|e| match e.kind() {
            // `alg: none` and unknown algorithms fail to parse as a header.
            ErrorKind::Json(_) => AuthError::Algorithm,
            _ => AuthError::Malformed,
        })?;
        let key =
            self.keys.iter().find(|(alg, _)| *alg == header.alg).map(|(_, key)| key).ok_or(AuthError::Algorithm)?;
        let mut validation = Validation::new(header.alg);
        validation.leeway = 5;
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp", "sub"]);
        // jsonwebtoken checks `iss`/`aud` only when present; presence is checked below.
        match &self.issuer {
            Some(iss) => validation.set_issuer(&[iss]),
            None => validation.iss = None,
        }
        match &self.audience {
            Some(aud) => validation.set_audience(&[aud]),
            None => validation.validate_aud = false,
        }
        let data = jsonwebtoken::decode::<Claims>(token, key, &validation).map_err(|e| match e.kind() {
            ErrorKind::ExpiredSignature => AuthError::Expired,
            ErrorKind::ImmatureSignature => AuthError::NotYetValid,
            ErrorKind::InvalidIssuer => AuthError::Issuer,
            ErrorKind::InvalidAudience => AuthError::Audience,
            ErrorKind::InvalidSignature => AuthError::Signature,
            ErrorKind::InvalidAlgorithm => AuthError::Algorithm,
            _ => AuthError::Malformed,
        })?;
        let claims = data.claims;
        // A configured issuer or audience must be present, not only right when present.
        if self.issuer.is_some() && claims.iss.is_none() {
            return Err(AuthError::MissingIssuer);
        }
        if self.audience.is_some() && claims.aud.is_none() {
            return Err(AuthError::MissingAudience);
        }
        if !valid_user_id(&claims.sub) {
            return Err(AuthError::Subject);
        }
        Ok(Identity {
            user: claims.sub.into(),
            channels: claims.channels.map(Into::into),
            expires_at: Some(claims.exp),
        })
    }
}

/// User ids: 1 to 128 bytes, no control characters.
pub fn valid_user_id(user: &str) -> bool {
    !user.is_empty() && user.len() <= 128 && !user.chars().any(char::is_control)
}

/// Anonymous (demo) names: 1 to 64 of `A-Z a-z 0-9 _ . - @`.
pub fn valid_anonymous_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 64 && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-@".contains(&b))
}

pub use kit::glob_match;

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header, encode};
    use serde_json::json;

    fn now() -> u64 {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
    }

    fn hs(claims: serde_json::Value) -> String {
        encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(b"k").unwrap()).unwrap()
    }

    fn verifier() -> Verifier {
        Verifier::new(Some("iss1".into()), Some("aud1".into())).with_hs256(b"k").unwrap()
    }

    #[test]
    fn valid_token_gives_identity() {
        let t = hs(json!({"sub":"alice","exp":now()+60,"iss":"iss1","aud":"aud1","channels":["room:*"]}));
        let id = verifier().verify(&t).unwrap();
        assert_eq!(&*id.user, "alice");
        assert!(id.may_use("room:1"));
        assert!(!id.may_use("admin"));
    }

    #[test]
    fn each_bad_token_has_its_reason() {
        let v = verifier();
        let base = json!({"sub":"a","exp":now()+60,"iss":"iss1","aud":"aud1"});
        let with = |k: &str, val: serde_json::Value| {
            let mut c = base.clone();
            c[k] = val;
            hs(c)
        };
        assert_eq!(v.verify(&with("exp", json!(now() - 3600))).unwrap_err(), AuthError::Expired);
        assert_eq!(v.verify(&with("nbf", json!(now() + 3600))).unwrap_err(), AuthError::NotYetValid);
        assert_eq!(v.verify(&with("iss", json!("other"))).unwrap_err(), AuthError::Issuer);
        assert_eq!(v.verify(&with("aud", json!("other"))).unwrap_err(), AuthError::Audience);
        assert_eq!(v.verify(&with("sub", json!(""))).unwrap_err(), AuthError::Subject);
        let without = |keys: &[&str]| {
            let mut c = base.clone();
            for k in keys {
                c.as_object_mut().unwrap().remove(*k);
            }
            hs(c)
        };
        assert_eq!(v.verify(&without(&["iss"])).unwrap_err(), AuthError::MissingIssuer);
        assert_eq!(v.verify(&without(&["aud"])).unwrap_err(), AuthError::MissingAudience);
        assert_eq!(v.verify(&without(&["iss", "aud"])).unwrap_err(), AuthError::MissingIssuer);
        assert_eq!(v.verify(&with("aud", json!(null))).unwrap_err(), AuthError::MissingAudience);
        // Without a configured issuer/audience, neither claim is needed.
        let open = Verifier::new(None, None).with_hs256(b"k").unwrap();
        assert!(open.verify(&without(&["iss", "aud"])).is_ok());
        assert_eq!(v.verify("garbage").unwrap_err(), AuthError::Malformed);
        assert_eq!(v.verify(&"a".repeat(MAX_TOKEN_BYTES + 1)).unwrap_err(), AuthError::TooLarge);
        let other_key =
            encode(&Header::new(Algorithm::HS256), &base, &EncodingKey::from_secret(b"x").unwrap()).unwrap();
        assert_eq!(v.verify(&other_key).unwrap_err(), AuthError::Signature);
        let hs384 = encode(&Header::new(Algorithm::HS384), &base, &EncodingKey::from_secret(b"k").unwrap()).unwrap();
        assert_eq!(v.verify(&hs384).unwrap_err(), AuthError::Algorithm);
    }

    #[test]
    fn alg_none_is_refused() {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let header = b64.encode(br#"{"alg":"none","typ":"JWT"}"#);
        let body = b64.encode(format!(r#"{{"sub":"a","exp":{}}}"#, now() + 60));
        let token = format!("{header}.{body}.");
        assert_eq!(verifier().verify(&token).unwrap_err(), AuthError::Algorithm);
    }

    #[test]
    fn globs() {
        assert!(glob_match("room:*", "room:1"));
        assert!(glob_match("room:*", "room:"));
        assert!(glob_match("*", "x"));
        assert!(glob_match("a*b*c", "axxbyyc"));
        assert!(!glob_match("a*b*c", "axxbyy"));
        assert!(glob_match("exact", "exact"));
        assert!(!glob_match("exact", "exactly"));
    }

    #[test]
    fn anonymous_names() {
        assert!(valid_anonymous_name("alice_1.x-y@z"));
        assert!(!valid_anonymous_name(""));
        assert!(!valid_anonymous_name("a b"));
        assert!(!valid_anonymous_name(&"a".repeat(65)));
    }
}
