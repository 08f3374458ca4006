//! Who a connection is, and what it may do.
//!
//! With `auth = "jwt"` a connection presents a JWT as `?token=` (browsers cannot set headers
//! on a WebSocket): HS256 with `jwt_secret`, or RS256 / EdDSA with the public key in
//! `jwt_public_key` (a PEM file), for setups where only the application backend can mint
//! tokens. One algorithm is accepted, fixed by the configured key. Claims: `sub` (the user id,
//! required), `exp` (required), and optionally `info` (JSON shown to others in presence),
//! `channels` and `publish` (patterns of the channels the user may subscribe and publish to).
//! With `auth = "none"` (development only) anyone connects, as `?user=` or a generated id,
//! and may do everything.
//!
//! Patterns: `*` matches every channel, `room:*` every channel starting with `room:`, anything
//! else exactly that channel. `broadcast` is always allowed to subscribe.

use fanout::{Channel, Code, ConfigError};
use jsonwebtoken::{DecodingKey, Validation, errors::ErrorKind};
use serde::Deserialize;
use serde_json::Value;

use crate::Config;

/// Checks tokens (or lets everyone in).
pub enum Verifier {
    Anonymous,
    Jwt {
        key: DecodingKey,
        validation: Box<Validation>,
    },
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Verifier::Anonymous => f.write_str("Verifier::Anonymous"),
            Verifier::Jwt { validation, .. } => {
                write!(f, "Verifier::Jwt({:?})", validation.algorithms)
            }
        }
    }
}

/// Why a connection was refused. `code` and `message` go to the client as JSON (401).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct AuthError {
    pub code: Code,
    pub message: String,
}

impl AuthError {
    fn new(code: Code, message: impl Into<String>) -> Self {
        AuthError {
            code,
            message: message.into(),
        }
    }
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
    #[serde(default)]
    info: Option<Value>,
    #[serde(default)]
    channels: Option<Vec<String>>,
    #[serde(default)]
    publish: Option<Vec<String>>,
    #[serde(default)]
    jti: Option<String>,
    #[serde(default)]
    iat: Option<u64>,
}

/// Channel patterns a connection may use; `None` means every channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Patterns(Option<Vec<String>>);

impl Patterns {
    pub fn all() -> Self {
        Patterns(None)
    }

    /// No channel.
    pub fn none() -> Self {
        Patterns(Some(Vec::new()))
    }

    /// Comma-separated patterns (a setting): a name, or a prefix ending in `*`; empty: none.
    pub fn list(setting: &str) -> Self {
        Patterns(Some(
            setting
                .split(',')
                .map(str::trim)
                .filter(|p| !p.is_empty())
                .map(String::from)
                .collect(),
        ))
    }

    pub fn allows(&self, channel: &Channel) -> bool {
        let Some(patterns) = &self.0 else { return true };
        let name = channel.as_str();
        patterns
            .iter()
            .any(|pattern| match pattern.strip_suffix('*') {
                Some(prefix) => name.starts_with(prefix),
                None => pattern == name,
            })
    }
}

/// A connection's identity.
#[derive(Debug, Clone, PartialEq)]
pub struct Identity {
    pub user: String,
    /// Shown to other members in presence.
    pub info: Option<Value>,
    pub subscribe: Patterns,
    pub publish: Patterns,
    /// Unix seconds after which the connection must present a fresh token (or be closed).
    pub expires_at: Option<u64>,
    /// The token's id (`jti`) and issue time (`iat`, unix seconds), for revocations.
    pub jti: Option<String>,
    pub issued_at: Option<u64>,
    /// Channels the app's connect hook subscribes the connection to at once.
    pub channels: Vec<Channel>,
}

impl Identity {
    /// fanout's own channels (`_fanout.…`) are no one's.
    pub fn may_subscribe(&self, channel: &Channel) -> bool {
        channel.is_broadcast() || (!channel.is_internal() && self.subscribe.allows(channel))
    }

    pub fn may_publish(&self, channel: &Channel) -> bool {
        !channel.is_internal() && self.publish.allows(channel)
    }
}

/// Longest accepted user id (anonymous `?user=` or a token's `sub`).
const MAX_USER: usize = 128;

impl Verifier {
    /// Builds the verifier the settings describe; errors name the setting.
    pub fn from_config(config: &Config) -> Result<Verifier, ConfigError> {
        Ok(match config.jwt_key()? {
            None => Verifier::Anonymous,
            Some((key, algorithm)) => {
                let mut validation = Validation::new(algorithm);
                validation.leeway = 5;
                Verifier::Jwt {
                    key,
                    validation: Box::new(validation),
                }
            }
        })
    }

    /// The identity of a connection presenting `token` (jwt) or `user` (none).
    pub fn identify(&self, token: Option<&str>, user: Option<&str>) -> Result<Identity, AuthError> {
        match self {
            Verifier::Anonymous => {
                let user = match user {
                    Some(user) if valid_user(user) => user.to_string(),
                    Some(_) => {
                        return Err(AuthError::new(
                            Code::InvalidUser,
                            format!("?user= must be 1-{MAX_USER} printable characters"),
                        ));
                    }
                    None => format!("anon-{}", uuid::Uuid::new_v4().simple()),
                };
                Ok(Identity {
                    user,
                    info: None,
                    subscribe: Patterns::all(),
                    publish: Patterns::all(),
                    expires_at: None,
                    jti: None,
                    issued_at: None,
                    channels: Vec::new(),
                })
            }
            Verifier::Jwt { key, validation } => {
                let token = token.filter(|t| !t.is_empty()).ok_or_else(|| {
                    AuthError::new(Code::MissingToken, "this node requires a JWT as ?token=")
                })?;
                let claims = jsonwebtoken::decode::<Claims>(token, key, validation)
                    .map_err(|err| match err.kind() {
                        ErrorKind::ExpiredSignature => {
                            AuthError::new(Code::TokenExpired, "the token has expired")
                        }
                        ErrorKind::InvalidSignature => AuthError::new(
                            Code::InvalidSignature,
                            "the token's signature does not verify",
                        ),
                        ErrorKind::InvalidAlgorithm => AuthError::new(
                            Code::WrongAlgorithm,
                            format!(
                                "the token is not signed with {:?}",
                                validation.algorithms[0]
                            ),
                        ),
                        ErrorKind::MissingRequiredClaim(claim) => AuthError::new(
                            Code::InvalidToken,
                            format!("the token has no \"{claim}\" claim"),
                        ),
                        _ => AuthError::new(
                            Code::InvalidToken,
                            format!("the token cannot be used: {err}"),
                        ),
                    })?
                    .claims;
                if !valid_user(&claims.sub) {
                    return Err(AuthError::new(
                        Code::InvalidToken,
                        format!("\"sub\" must be 1-{MAX_USER} printable characters"),
                    ));
                }
                Ok(Identity {
                    user: claims.sub,
                    info: claims.info,
                    subscribe: Patterns(claims.channels),
                    publish: Patterns(claims.publish.or(Some(Vec::new()))),
                    expires_at: Some(claims.exp),
                    jti: claims.jti,
                    issued_at: claims.iat,
                    channels: Vec::new(),
                })
            }
        }
    }
}

pub(crate) fn valid_user(user: &str) -> bool {
    !user.is_empty() && user.len() <= MAX_USER && !user.chars().any(char::is_control)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ch(name: &str) -> Channel {
        Channel::parse(name).unwrap()
    }

    #[test]
    fn patterns_match_exactly_or_by_prefix() {
        let p = Patterns(Some(vec!["room:*".into(), "user:42".into()]));
        assert!(p.allows(&ch("room:maths")));
        assert!(p.allows(&ch("user:42")));
        assert!(!p.allows(&ch("user:421")));
        assert!(!p.allows(&ch("roomx")));
        assert!(Patterns(Some(vec!["*".into()])).allows(&ch("any")));
        assert!(!Patterns(Some(vec![])).allows(&ch("any")));
        assert!(Patterns::all().allows(&ch("any")));
    }

    #[test]
    fn anonymous_users_get_an_id() {
        let v = Verifier::Anonymous;
        assert_eq!(v.identify(None, Some("ada")).unwrap().user, "ada");
        assert!(v.identify(None, None).unwrap().user.starts_with("anon-"));
        assert_eq!(
            v.identify(None, Some("")).unwrap_err().code,
            Code::InvalidUser
        );
    }
}
