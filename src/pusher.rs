//! The Pusher protocol's apps and signatures, as both front doors need them: the apps
//! (`FANOUT_PUSHER_APPS`: `app_id:key:secret[:prefix]`, comma-separated), the signature of a
//! request to the HTTP API (Pusher's "auth_signature": HMAC-SHA256 of the method, the path
//! and the sorted query, with the body's MD5), and the signature of a private or presence
//! channel's subscription (`key:HMAC-SHA256(secret, "socket_id:channel[:channel_data]")`).
//!
//! It knows nothing of HTTP servers or sockets: callers hand it strings.

use md5::{Digest, Md5};
use ring::hmac;

/// How far a request's `auth_timestamp` may be from now (Pusher's rule), seconds.
pub const MAX_SKEW_SECS: u64 = 600;

/// One Pusher app.
#[derive(Clone, PartialEq, Eq)]
pub struct App {
    pub id: String,
    pub key: String,
    secret: String,
    /// What its channels are called in fanout: the prefix, then the Pusher name (none by
    /// default: a Pusher client and a fanout client share the channel).
    pub prefix: String,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App")
            .field("id", &self.id)
            .field("key", &self.key)
            .field("secret", &"********")
            .field("prefix", &self.prefix)
            .finish()
    }
}

/// Reads `FANOUT_PUSHER_APPS`: `app_id:key:secret[:prefix]`, comma-separated; ids and keys
/// unique. The error says what is wrong (the settings name the setting).
pub fn apps(setting: &str) -> Result<Vec<App>, String> {
    let mut apps: Vec<App> = Vec::new();
    for entry in setting.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let parts: Vec<&str> = entry.split(':').collect();
        let (id, key, secret, prefix) = match parts[..] {
            [id, key, secret] => (id, key, secret, ""),
            [id, key, secret, prefix] => (id, key, secret, prefix),
            _ => {
                return Err("each app is app_id:key:secret or app_id:key:secret:prefix".into());
            }
        };
        let word = |s: &str| {
            !s.is_empty()
                && s.len() <= 128
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        };
        if !word(id) || !word(key) || secret.len() < 8 {
            return Err(format!(
                "app {id:?}: the id and key are letters, digits, '-', '_' or '.'; the secret \
                 at least 8 characters"
            ));
        }
        if apps.iter().any(|a| a.id == id || a.key == key) {
            return Err(format!("app {id:?}: two apps share an id or a key"));
        }
        apps.push(App {
            id: id.into(),
            key: key.into(),
            secret: secret.into(),
            prefix: prefix.into(),
        });
    }
    Ok(apps)
}

/// How a signed-in user's channel (`#server-to-user-<id>`, where the events the app sends to
/// the user go) begins in Pusher's names.
pub const USER_CHANNEL: &str = "#server-to-user-";

/// How it begins in fanout's names: `#` cannot be in a fanout name, and `:` is in no Pusher
/// name, so no other Pusher channel is called so.
pub const FANOUT_USER_CHANNEL: &str = "server-to-user:";

/// The fanout name of a Pusher channel name (before the app's prefix): the same, but for a
/// user's channel ([`USER_CHANNEL`] → [`FANOUT_USER_CHANNEL`]).
pub fn fanout_name(pusher: &str) -> std::borrow::Cow<'_, str> {
    match pusher.strip_prefix(USER_CHANNEL) {
        Some(user) => format!("{FANOUT_USER_CHANNEL}{user}").into(),
        None => pusher.into(),
    }
}

/// The Pusher name of a fanout channel name (the app's prefix taken off): [`fanout_name`]
/// undone.
pub fn pusher_name(fanout: &str) -> std::borrow::Cow<'_, str> {
    match fanout.strip_prefix(FANOUT_USER_CHANNEL) {
        Some(user) => format!("{USER_CHANNEL}{user}").into(),
        None => fanout.into(),
    }
}

/// A connection's socket id as Pusher's libraries take it (`<digits>.<digits>`): its id's
/// two halves, so that [`conn_of`] finds the connection again.
pub fn socket_id(conn: &uuid::Uuid) -> String {
    let n = conn.as_u128();
    format!("{}.{}", (n >> 64) as u64, n as u64)
}

/// The connection a socket id ([`socket_id`]) names; none when it is not one.
pub fn conn_of(socket_id: &str) -> Option<uuid::Uuid> {
    let (high, low) = socket_id.split_once('.')?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(high) || !digits(low) {
        return None;
    }
    let (high, low): (u64, u64) = (high.parse().ok()?, low.parse().ok()?);
    Some(uuid::Uuid::from_u128(
        (u128::from(high) << 64) | u128::from(low),
    ))
}

fn sign(secret: &str, text: &str) -> String {
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret.as_bytes());
    hex(hmac::sign(&key, text.as_bytes()).as_ref())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The MD5 of a body, hex, as `body_md5` carries it.
pub fn body_md5(body: &[u8]) -> String {
    hex(&Md5::digest(body))
}

/// Why a request's signature does not hold.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("missing {0}")]
    Missing(&'static str),
    #[error("auth_key does not name this app")]
    UnknownKey,
    #[error("auth_version must be 1.0")]
    Version,
    #[error(
        "timestamp expired: given timestamp ({given}) not within {MAX_SKEW_SECS}s of server time ({now})"
    )]
    Stale { given: u64, now: u64 },
    #[error("body_md5 does not match the body")]
    BodyMd5,
    #[error("invalid signature: the string to sign was {0:?}")]
    Signature(String),
}

impl App {
    /// The signature of a private or presence channel's subscription by `socket_id`:
    /// `key:hex(HMAC-SHA256(secret, "socket_id:channel[:channel_data]"))`.
    pub fn channel_auth(
        &self,
        socket_id: &str,
        channel: &str,
        channel_data: Option<&str>,
    ) -> String {
        let mut text = format!("{socket_id}:{channel}");
        if let Some(data) = channel_data {
            text.push(':');
            text.push_str(data);
        }
        format!("{}:{}", self.key, sign(&self.secret, &text))
    }

    /// Whether `auth` is the signature of that subscription (compared in constant time).
    pub fn verify_channel_auth(
        &self,
        auth: &str,
        socket_id: &str,
        channel: &str,
        channel_data: Option<&str>,
    ) -> bool {
        let expected = self.channel_auth(socket_id, channel, channel_data);
        crate::secret::same(expected.as_bytes(), auth.as_bytes())
    }

    /// The signature of a user's sign-in on `socket_id` (`pusher:signin`):
    /// `key:hex(HMAC-SHA256(secret, "socket_id::user::user_data"))`.
    pub fn user_auth(&self, socket_id: &str, user_data: &str) -> String {
        let signature = sign(&self.secret, &format!("{socket_id}::user::{user_data}"));
        format!("{}:{signature}", self.key)
    }

    /// Whether `auth` is [`App::user_auth`]'s signature.
    pub fn verify_user_auth(&self, auth: &str, socket_id: &str, user_data: &str) -> bool {
        let expected = self.user_auth(socket_id, user_data);
        crate::secret::same(expected.as_bytes(), auth.as_bytes())
    }

    /// The query that signs a request to the HTTP API (`method`, `path`, `body`) at `now`
    /// (unix seconds), as Pusher's server libraries sign it.
    pub fn sign_request(&self, method: &str, path: &str, body: &[u8], now: u64) -> String {
        let mut query = format!(
            "auth_key={}&auth_timestamp={now}&auth_version=1.0",
            self.key
        );
        if !body.is_empty() {
            query = format!("{query}&body_md5={}", body_md5(body));
        }
        let text = format!("{}\n{path}\n{query}", method.to_ascii_uppercase());
        format!("{query}&auth_signature={}", sign(&self.secret, &text))
    }

    /// Checks a request to the HTTP API: `method` and `path` as sent, `query` its
    /// parameters (decoded), `body` (empty for a GET), at `now` (unix seconds).
    pub fn verify_request(
        &self,
        method: &str,
        path: &str,
        query: &[(String, String)],
        body: &[u8],
        now: u64,
    ) -> Result<(), SignatureError> {
        let get = |name: &'static str| {
            query
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
                .ok_or(SignatureError::Missing(name))
        };
        if get("auth_key")? != self.key {
            return Err(SignatureError::UnknownKey);
        }
        if get("auth_version")? != "1.0" {
            return Err(SignatureError::Version);
        }
        let given: u64 = get("auth_timestamp")?
            .parse()
            .map_err(|_| SignatureError::Missing("auth_timestamp"))?;
        if given.abs_diff(now) > MAX_SKEW_SECS {
            return Err(SignatureError::Stale { given, now });
        }
        if !body.is_empty() && get("body_md5")? != body_md5(body) {
            return Err(SignatureError::BodyMd5);
        }
        let signature = get("auth_signature")?;
        let mut params: Vec<(String, &str)> = query
            .iter()
            .filter(|(k, _)| k != "auth_signature")
            .map(|(k, v)| (k.to_ascii_lowercase(), v.as_str()))
            .collect();
        params.sort();
        let query: Vec<String> = params.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let text = format!(
            "{}\n{path}\n{}",
            method.to_ascii_uppercase(),
            query.join("&")
        );
        let expected = sign(&self.secret, &text);
        match crate::secret::same(expected.as_bytes(), signature.as_bytes()) {
            true => Ok(()),
            false => Err(SignatureError::Signature(text)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn app() -> App {
        apps("3:278d425bdf160c739803:7ad3773142a6692b25b8")
            .unwrap()
            .remove(0)
    }

    #[test]
    fn apps_are_read_or_refused() {
        let apps = apps("1:k1:secret-one, 2:k2:secret-two:pusher.").unwrap();
        assert_eq!(apps[1].prefix, "pusher.");
        assert!(format!("{:?}", apps[0]).contains("********"));
        for bad in [
            "1:k1",
            "1:k1:short",
            "1:k1:secret-one,1:k2:secret-two",
            "a b:k:secret-one",
        ] {
            assert!(super::apps(bad).is_err(), "{bad}");
        }
    }

    /// Pusher's documentation's examples ("Generating authentication signatures", "Private
    /// channels").
    #[test]
    fn signatures_are_pushers() {
        let app = app();
        assert_eq!(
            app.channel_auth("1234.1234", "private-foobar", None),
            "278d425bdf160c739803:58df8b0c36d6982b82c3ecf6b4662e34fe8c25bba48f5369f135bf843651c3a4"
        );
        let body = br#"{"name":"foo","channels":["project-3"],"data":"{\"some\":\"data\"}"}"#;
        assert_eq!(body_md5(body), "ec365a775a4cd0599faeb73354201b6f");
        let mut query: Vec<(String, String)> = [
            ("auth_key", "278d425bdf160c739803"),
            ("auth_timestamp", "1353088179"),
            ("auth_version", "1.0"),
            ("body_md5", "ec365a775a4cd0599faeb73354201b6f"),
            (
                "auth_signature",
                "da454824c97ba181a32ccc17a72625ba02771f50b50e1e7430e47a1f3f457e6c",
            ),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert_eq!(
            app.verify_request("POST", "/apps/3/events", &query, body, 1353088179),
            Ok(())
        );
        assert!(matches!(
            app.verify_request("POST", "/apps/3/events", &query, body, 1353088179 + 601),
            Err(SignatureError::Stale { .. })
        ));
        assert_eq!(
            app.verify_request("POST", "/apps/3/events", &query, b"{}", 1353088179),
            Err(SignatureError::BodyMd5)
        );
        query[4].1 = "00".repeat(32);
        assert!(matches!(
            app.verify_request("POST", "/apps/3/events", &query, body, 1353088179),
            Err(SignatureError::Signature(_))
        ));
    }

    #[test]
    fn a_socket_id_names_its_connection_again() {
        let conn = uuid::Uuid::new_v4();
        let id = socket_id(&conn);
        assert!(id.split_once('.').is_some(), "{id}");
        assert_eq!(conn_of(&id), Some(conn));
        for bad in [
            "",
            "1",
            "1.",
            ".1",
            "a.1",
            "1.2.3",
            "-1.2",
            "18446744073709551616.1",
        ] {
            assert_eq!(conn_of(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_signed_request_holds() {
        let app = app();
        let body = br#"{"name":"foo","channels":["project-3"],"data":"{\"some\":\"data\"}"}"#;
        let query = app.sign_request("POST", "/apps/3/events", body, 1_353_088_179);
        let params: Vec<(String, String)> = query
            .split('&')
            .map(|kv| kv.split_once('=').unwrap())
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        assert_eq!(
            app.verify_request("POST", "/apps/3/events", &params, body, 1_353_088_179),
            Ok(())
        );
    }

    #[test]
    fn a_users_channel_has_a_fanout_name_and_back() {
        assert_eq!(fanout_name("#server-to-user-ada"), "server-to-user:ada");
        assert_eq!(pusher_name("server-to-user:ada"), "#server-to-user-ada");
        assert_eq!(fanout_name("private-room"), "private-room");
        assert_eq!(pusher_name("private-room"), "private-room");
        assert!(crate::Channel::parse(&fanout_name("#server-to-user-ada")).is_ok());
    }

    /// A sign-in signed as Pusher's server library signs it (`authenticateUser`).
    #[test]
    fn a_users_sign_in_is_signed_as_pusher_signs_it() {
        let app = app();
        let auth = app.user_auth("1234.1234", r#"{"id":"ada"}"#);
        assert!(auth.starts_with("278d425bdf160c739803:"));
        assert!(app.verify_user_auth(&auth, "1234.1234", r#"{"id":"ada"}"#));
        assert!(!app.verify_user_auth(&auth, "1234.1235", r#"{"id":"ada"}"#));
    }
}
