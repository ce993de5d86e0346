//! Authentication and room authorization.
//!
//! A connection presents a JWT whose algorithm is pinned by configuration (never taken from
//! the token). Its claims say who the user is (`sub`), their tenant, which room patterns they
//! may join (`rooms`) and which permissions they hold (`perms`, mapped to room patterns by
//! config). A backend can also hand out short-lived subscription tokens that grant named rooms
//! to one user, so roomcast never needs to know the domain behind `task:{id}`.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{decode, errors::ErrorKind, DecodingKey, Validation};
use serde::{Deserialize, Serialize};

use crate::config::{Algorithm, AuthConfig, ConfigError};
use crate::pattern::Pattern;

/// Most room patterns one token may grant in its `rooms` claim, and most entries of its
/// `perms` claim (and most patterns `auth.perms` may map one permission to): every join is
/// checked against all of an identity's grants.
pub const MAX_TOKEN_GRANTS: usize = 256;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("missing token")]
    Missing,
    #[error("malformed token")]
    Malformed,
    #[error("token expired")]
    Expired,
    #[error("token not yet valid")]
    NotYetValid,
    #[error("invalid signature")]
    BadSignature,
    #[error("algorithm not allowed")]
    WrongAlgorithm,
    #[error("invalid claims: {0}")]
    Claims(String),
    #[error("token is for another user or tenant")]
    Mismatch,
}

impl AuthError {
    /// A bounded label for metrics and the short reason in a 401 body.
    pub fn reason(&self) -> &'static str {
        match self {
            AuthError::Missing => "missing_token",
            AuthError::Malformed => "malformed_token",
            AuthError::Expired => "expired_token",
            AuthError::NotYetValid => "immature_token",
            AuthError::BadSignature => "bad_signature",
            AuthError::WrongAlgorithm => "wrong_algorithm",
            AuthError::Claims(_) => "invalid_claims",
            AuthError::Mismatch => "token_mismatch",
        }
    }
}

/// The claims roomcast reads. Unknown claims are ignored.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct Claims {
    pub sub: String,
    pub exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rooms: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub perms: Vec<String>,
}

/// Who is on the other end of a connection and what they may join.
#[derive(Debug, Clone)]
pub struct Identity {
    pub user: String,
    pub tenant: Option<String>,
    pub expires_at: u64,
    grants: Vec<Pattern>,
}

impl Identity {
    /// The user of its tenant as one number, for counting its connections: eight bytes a
    /// connection instead of two strings. Two users sharing a key would share a cap, which
    /// at 64 bits does not happen by chance, and users do not choose their ids.
    pub fn key(&self) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (&self.tenant, &self.user).hash(&mut h);
        h.finish()
    }

    /// Rooms every connection joins and may always join: its user room and tenant room.
    pub fn own_rooms(&self) -> Vec<String> {
        let mut rooms = vec![format!("user:{}", self.user)];
        if let Some(t) = &self.tenant {
            rooms.push(tenant_room(t));
        }
        rooms
    }

    pub fn may_join(&self, room: &str) -> bool {
        self.own_rooms().iter().any(|r| r == room) || self.grants.iter().any(|p| p.matches(room))
    }
}

/// The room every connection of `tenant` is in from its welcome on.
pub fn tenant_room(tenant: &str) -> String {
    format!("tenant:{tenant}")
}

pub struct Authenticator {
    key: DecodingKey,
    validation: Validation,
    perms: BTreeMap<String, Vec<Pattern>>,
}

impl Authenticator {
    pub fn from_config(c: &AuthConfig) -> Result<Authenticator, ConfigError> {
        let key = decoding_key(c)?;
        let mut validation = Validation::new(jwt_algorithm(c.algorithm));
        validation.leeway = c.leeway_seconds;
        validation.validate_nbf = true;
        let mut required = vec!["exp", "sub"];
        validation.validate_aud = c.audience.is_some();
        if let Some(aud) = &c.audience {
            validation.set_audience(&[aud]);
            required.push("aud");
        }
        if let Some(iss) = &c.issuer {
            validation.set_issuer(&[iss]);
            required.push("iss");
        }
        validation.set_required_spec_claims(&required);
        let perms = c
            .perms
            .iter()
            .map(|(perm, rooms)| {
                let patterns = room_patterns(rooms)
                    .map_err(|e| ConfigError::invalid(format!("auth.perms.{perm}"), e))?;
                Ok((perm.clone(), patterns))
            })
            .collect::<Result<_, ConfigError>>()?;
        Ok(Authenticator {
            key,
            validation,
            perms,
        })
    }

    fn claims(&self, token: &str) -> Result<Claims, AuthError> {
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        let data = decode::<Claims>(token, &self.key, &self.validation).map_err(|e| {
            if names_unknown_algorithm(token) {
                AuthError::WrongAlgorithm
            } else {
                classify(e)
            }
        })?;
        if data.claims.sub.is_empty() {
            return Err(AuthError::Claims("empty sub".into()));
        }
        Ok(data.claims)
    }

    /// Validates a connection token.
    pub fn authenticate(&self, token: &str) -> Result<Identity, AuthError> {
        let claims = self.claims(token)?;
        let mut grants = claimed_rooms(&claims.rooms)?;
        if claims.perms.len() > MAX_TOKEN_GRANTS {
            return Err(AuthError::Claims(format!(
                "perms: {} entries are over the limit of {MAX_TOKEN_GRANTS}",
                claims.perms.len()
            )));
        }
        // Each permission once: a token repeating one must not multiply its patterns.
        let perms: BTreeSet<&String> = claims.perms.iter().collect();
        for perm in perms {
            if let Some(patterns) = self.perms.get(perm) {
                grants.extend(patterns.iter().cloned());
            }
        }
        Ok(Identity {
            user: claims.sub,
            tenant: claims.tenant.filter(|t| !t.is_empty()),
            expires_at: claims.exp,
            grants,
        })
    }

    /// Validates a subscription token for `identity` and returns the room patterns it grants.
    pub fn subscription_grants(
        &self,
        identity: &Identity,
        token: &str,
    ) -> Result<Vec<Pattern>, AuthError> {
        let claims = self.claims(token)?;
        if claims.sub != identity.user || claims.tenant.filter(|t| !t.is_empty()) != identity.tenant
        {
            return Err(AuthError::Mismatch);
        }
        claimed_rooms(&claims.rooms)
    }
}

/// Room patterns within the limits of a grant; the error says which limit.
fn room_patterns(rooms: &[String]) -> Result<Vec<Pattern>, String> {
    if rooms.len() > MAX_TOKEN_GRANTS {
        return Err(format!(
            "{} patterns are over the limit of {MAX_TOKEN_GRANTS}",
            rooms.len()
        ));
    }
    rooms
        .iter()
        .map(|r| Pattern::room(r).map_err(|e| e.to_string()))
        .collect()
}

fn claimed_rooms(rooms: &[String]) -> Result<Vec<Pattern>, AuthError> {
    room_patterns(rooms).map_err(|e| AuthError::Claims(format!("rooms: {e}")))
}

/// True when the token's header names an algorithm jsonwebtoken does not know, `none` above
/// all. It reads `alg` into the algorithms it knows, so such a token fails as unreadable JSON,
/// which would be counted as `invalid_claims`; it is refused for its algorithm instead.
fn names_unknown_algorithm(token: &str) -> bool {
    use base64::Engine;
    let Some((header, _)) = token.split_once('.') else {
        return false;
    };
    let Ok(json) = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(header) else {
        return false;
    };
    let Ok(header) = serde_json::from_slice::<serde_json::Value>(&json) else {
        return false;
    };
    header["alg"]
        .as_str()
        .is_some_and(|alg| alg.parse::<jsonwebtoken::Algorithm>().is_err())
}

fn classify(e: jsonwebtoken::errors::Error) -> AuthError {
    match e.kind() {
        ErrorKind::ExpiredSignature => AuthError::Expired,
        ErrorKind::ImmatureSignature => AuthError::NotYetValid,
        ErrorKind::InvalidSignature => AuthError::BadSignature,
        ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => AuthError::WrongAlgorithm,
        ErrorKind::InvalidAudience => AuthError::Claims("audience".into()),
        ErrorKind::InvalidIssuer => AuthError::Claims("issuer".into()),
        ErrorKind::MissingRequiredClaim(c) => AuthError::Claims(format!("missing {c}")),
        ErrorKind::InvalidSubject => AuthError::Claims("subject".into()),
        ErrorKind::Json(_) => AuthError::Claims("unreadable claims".into()),
        _ => AuthError::Malformed,
    }
}

pub fn jwt_algorithm(a: Algorithm) -> jsonwebtoken::Algorithm {
    use jsonwebtoken::Algorithm as J;
    match a {
        Algorithm::HS256 => J::HS256,
        Algorithm::HS384 => J::HS384,
        Algorithm::HS512 => J::HS512,
        Algorithm::RS256 => J::RS256,
        Algorithm::RS384 => J::RS384,
        Algorithm::RS512 => J::RS512,
        Algorithm::ES256 => J::ES256,
        Algorithm::ES384 => J::ES384,
        Algorithm::EdDSA => J::EdDSA,
    }
}

fn decoding_key(c: &AuthConfig) -> Result<DecodingKey, ConfigError> {
    let hmac = matches!(
        c.algorithm,
        Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512
    );
    if hmac {
        let secret = c.secret.as_deref().unwrap_or_default();
        if secret.len() < 16 {
            return Err(ConfigError::invalid(
                "auth.secret",
                format!(
                    "a secret of at least 16 bytes is required for {:?} (ROOMCAST_JWT_SECRET)",
                    c.algorithm
                ),
            ));
        }
        return Ok(DecodingKey::from_secret(secret.as_bytes()));
    }
    let path = c.public_key_file.as_ref().ok_or_else(|| {
        ConfigError::invalid(
            "auth.public_key_file",
            format!(
                "a PEM public key is required for {:?} (ROOMCAST_JWT_PUBLIC_KEY_FILE)",
                c.algorithm
            ),
        )
    })?;
    let pem = std::fs::read(path).map_err(|e| {
        ConfigError::invalid(
            "auth.public_key_file",
            format!("cannot read {}: {e}", path.display()),
        )
    })?;
    let key = match c.algorithm {
        Algorithm::RS256 | Algorithm::RS384 | Algorithm::RS512 => DecodingKey::from_rsa_pem(&pem),
        Algorithm::ES256 | Algorithm::ES384 => DecodingKey::from_ec_pem(&pem),
        _ => DecodingKey::from_ed_pem(&pem),
    };
    key.map_err(|e| {
        ConfigError::invalid(
            "auth.public_key_file",
            format!("not a {:?} public key: {e}", c.algorithm),
        )
    })
}

pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Signs HS256 claims: used by the demo and by tests to mint tokens.
pub fn sign_hs256(secret: &str, claims: &Claims) -> String {
    let key = jsonwebtoken::EncodingKey::from_secret(secret.as_bytes());
    jsonwebtoken::encode(&jsonwebtoken::Header::default(), claims, &key)
        .expect("HS256 signing cannot fail")
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "0123456789abcdef-test";

    fn auth() -> Authenticator {
        let mut c = AuthConfig {
            secret: Some(SECRET.into()),
            ..AuthConfig::default()
        };
        c.perms
            .insert("users:read".into(), vec!["feature:users".into()]);
        Authenticator::from_config(&c).unwrap()
    }

    fn claims(sub: &str, exp_in: i64) -> Claims {
        Claims {
            sub: sub.into(),
            exp: (now_secs() as i64 + exp_in) as u64,
            ..Claims::default()
        }
    }

    #[test]
    fn valid_token_gives_identity_with_grants() {
        let mut c = claims("42", 60);
        c.tenant = Some("acme".into());
        c.rooms = vec!["task:*".into()];
        c.perms = vec!["users:read".into(), "unknown:perm".into()];
        let id = auth().authenticate(&sign_hs256(SECRET, &c)).unwrap();
        assert_eq!(id.user, "42");
        assert_eq!(id.own_rooms(), ["user:42", "tenant:acme"]);
        assert!(id.may_join("user:42"));
        assert!(id.may_join("tenant:acme"));
        assert!(id.may_join("task:9"));
        assert!(id.may_join("feature:users"));
        assert!(!id.may_join("feature:rbac"));
        assert!(!id.may_join("user:43"));
    }

    #[test]
    fn bad_tokens_are_classified() {
        let a = auth();
        assert_eq!(a.authenticate("").unwrap_err(), AuthError::Missing);
        assert_eq!(a.authenticate("abc").unwrap_err(), AuthError::Malformed);
        let expired = sign_hs256(SECRET, &claims("1", -600));
        assert_eq!(a.authenticate(&expired).unwrap_err(), AuthError::Expired);
        let forged = sign_hs256("another-secret-entirely", &claims("1", 60));
        assert_eq!(
            a.authenticate(&forged).unwrap_err(),
            AuthError::BadSignature
        );
        let hs512 = jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS512),
            &claims("1", 60),
            &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap();
        assert_eq!(
            a.authenticate(&hs512).unwrap_err(),
            AuthError::WrongAlgorithm
        );
    }

    #[test]
    fn audience_and_issuer_are_required_when_configured() {
        let c = AuthConfig {
            secret: Some(SECRET.into()),
            audience: Some("roomcast".into()),
            issuer: Some("backend".into()),
            ..AuthConfig::default()
        };
        let a = Authenticator::from_config(&c).unwrap();
        let without = sign_hs256(SECRET, &claims("1", 60));
        assert!(matches!(
            a.authenticate(&without),
            Err(AuthError::Claims(_))
        ));
        #[derive(Serialize)]
        struct Full {
            sub: &'static str,
            exp: u64,
            aud: &'static str,
            iss: &'static str,
        }
        let key = jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes());
        let header = jsonwebtoken::Header::default();
        let exp = now_secs() + 60;
        let good = Full {
            sub: "1",
            exp,
            aud: "roomcast",
            iss: "backend",
        };
        assert!(a
            .authenticate(&jsonwebtoken::encode(&header, &good, &key).unwrap())
            .is_ok());
        let wrong = Full {
            aud: "other",
            ..good
        };
        let token = jsonwebtoken::encode(&header, &wrong, &key).unwrap();
        assert!(matches!(a.authenticate(&token), Err(AuthError::Claims(_))));
    }

    #[test]
    fn an_unsigned_token_is_refused_for_its_algorithm() {
        use base64::Engine;
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        let body = b64(&format!(r#"{{"sub":"42","exp":{}}}"#, now_secs() + 60));
        let a = auth();
        for alg in ["none", "None", "NONE", "HS1024"] {
            let header = b64(&format!(r#"{{"alg":"{alg}","typ":"JWT"}}"#));
            for signature in ["", "c2ln"] {
                let token = format!("{header}.{body}.{signature}");
                let err = a.authenticate(&token).unwrap_err();
                assert_eq!(err, AuthError::WrongAlgorithm, "{alg} {signature:?}");
                assert_eq!(err.reason(), "wrong_algorithm");
            }
        }
        // A known algorithm's token with unreadable claims is still about its claims.
        let unreadable = serde_json::json!({"sub": 42, "exp": now_secs() + 60});
        let key = jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes());
        let token =
            jsonwebtoken::encode(&jsonwebtoken::Header::default(), &unreadable, &key).unwrap();
        assert_eq!(
            a.authenticate(&token).unwrap_err(),
            AuthError::Claims("unreadable claims".into())
        );
    }

    #[test]
    fn subscription_token_must_match_user_and_tenant() {
        let a = auth();
        let id = a
            .authenticate(&sign_hs256(SECRET, &claims("42", 60)))
            .unwrap();
        let mut grant = claims("42", 30);
        grant.rooms = vec!["task:9".into()];
        let patterns = a
            .subscription_grants(&id, &sign_hs256(SECRET, &grant))
            .unwrap();
        assert!(patterns[0].matches("task:9"));
        grant.sub = "43".into();
        let other = sign_hs256(SECRET, &grant);
        assert_eq!(
            a.subscription_grants(&id, &other).unwrap_err(),
            AuthError::Mismatch
        );
    }

    #[test]
    fn a_token_grants_a_bounded_number_of_bounded_patterns() {
        let a = auth();
        let mut c = claims("42", 60);
        c.rooms = (0..MAX_TOKEN_GRANTS).map(|i| format!("task:{i}")).collect();
        assert!(a.authenticate(&sign_hs256(SECRET, &c)).is_ok());
        c.rooms.push("task:x".into());
        let err = a.authenticate(&sign_hs256(SECRET, &c)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid claims: rooms: 257 patterns are over the limit of 256"
        );
        assert_eq!(err.reason(), "invalid_claims");
        c.rooms = vec![format!("task:{}", "x".repeat(300))];
        assert_eq!(
            a.authenticate(&sign_hs256(SECRET, &c)).unwrap_err(),
            AuthError::Claims(
                "rooms: a pattern of 305 bytes is over the limit of 256 bytes".into()
            )
        );
        c.rooms = Vec::new();
        c.perms = vec!["users:read".into(); MAX_TOKEN_GRANTS + 1];
        assert_eq!(
            a.authenticate(&sign_hs256(SECRET, &c)).unwrap_err(),
            AuthError::Claims("perms: 257 entries are over the limit of 256".into())
        );
    }

    #[test]
    fn a_repeated_permission_grants_its_patterns_once() {
        let mut c = claims("42", 60);
        c.perms = vec!["users:read".into(); MAX_TOKEN_GRANTS];
        let id = auth().authenticate(&sign_hs256(SECRET, &c)).unwrap();
        assert_eq!(id.grants.len(), 1);
    }

    #[test]
    fn subscription_grants_are_bounded() {
        let a = auth();
        let id = a
            .authenticate(&sign_hs256(SECRET, &claims("42", 60)))
            .unwrap();
        let mut grant = claims("42", 30);
        grant.rooms = vec![vec!["x"; 33].join(":")];
        assert_eq!(
            a.subscription_grants(&id, &sign_hs256(SECRET, &grant))
                .unwrap_err(),
            AuthError::Claims(
                "rooms: a pattern of 33 segments is over the limit of 32 segments".into()
            )
        );
    }

    #[test]
    fn configured_permissions_are_bounded_and_name_their_key() {
        let mut c = AuthConfig {
            secret: Some(SECRET.into()),
            ..AuthConfig::default()
        };
        c.perms.insert(
            "tasks:all".into(),
            (0..=MAX_TOKEN_GRANTS)
                .map(|i| format!("task:{i}"))
                .collect(),
        );
        let err = Authenticator::from_config(&c).err().unwrap().to_string();
        assert_eq!(
            err,
            "auth.perms.tasks:all: 257 patterns are over the limit of 256"
        );
        c.perms.insert(
            "tasks:all".into(),
            vec![format!("task:{}", "*:".repeat(200))],
        );
        let err = Authenticator::from_config(&c).err().unwrap().to_string();
        assert_eq!(
            err,
            "auth.perms.tasks:all: a pattern of 405 bytes is over the limit of 256 bytes"
        );
    }

    #[test]
    fn short_secret_and_missing_key_are_config_errors() {
        let c = AuthConfig {
            secret: Some("short".into()),
            ..AuthConfig::default()
        };
        assert!(Authenticator::from_config(&c).is_err());
        let c = AuthConfig {
            algorithm: Algorithm::RS256,
            ..AuthConfig::default()
        };
        let err = Authenticator::from_config(&c).err().unwrap().to_string();
        assert!(err.starts_with("auth.public_key_file:"), "{err}");
    }
}
