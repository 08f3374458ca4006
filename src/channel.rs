//! Channel names: what clients subscribe to and the API publishes to.
//!
//! A channel name becomes part of a NATS subject (`<prefix>.in.<channel>`), so this module is
//! strict: 1–128 characters of ASCII letters, digits and `_ - : = @`, with `.` allowed only
//! between non-empty segments. NATS wildcards (`*`, `>`) and whitespace can never appear.
//! It does not know about subjects themselves; [`crate::bus`] builds those.

use std::{fmt, sync::Arc};

/// The reserved channel every connection receives without subscribing.
pub const BROADCAST: &str = "broadcast";

/// The first segment of fanout's own channels.
pub const INTERNAL_PREFIX: &str = "_fanout.";

/// Longest channel name accepted, in characters (all of them are ASCII, so also bytes).
pub const MAX_LEN: usize = 128;

/// A validated channel name.
///
/// Cheap to clone (`Arc<str>`): the ws hub keeps one per channel and per subscription.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Channel(Arc<str>);

/// Why a string is not a channel name. The `Display` text is shown to users as is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChannelError {
    #[error("channel name is empty")]
    Empty,
    #[error("channel name is {0} characters long; the limit is {MAX_LEN}")]
    TooLong(usize),
    #[error(
        "channel name contains {0:?}; allowed are letters, digits, '_', '-', ':', '=', '@' and '.' between segments"
    )]
    InvalidChar(char),
    #[error("channel name has an empty segment; '.' must sit between non-empty segments")]
    EmptySegment,
}

impl Channel {
    /// Validates `name` and returns it as a channel.
    pub fn parse(name: &str) -> Result<Self, ChannelError> {
        validate(name)?;
        Ok(Channel(Arc::from(name)))
    }

    /// The reserved `broadcast` channel.
    pub fn broadcast() -> Self {
        Channel(Arc::from(BROADCAST))
    }

    /// The probe channel of process `node` (`_fanout.canary.<node>`), where a ws node's
    /// canary and the API's `/readyz` publish: the id's characters that a channel may not
    /// hold replaced by `_`.
    pub fn canary(node: &str) -> Self {
        let id: String = node
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | ':' | '=' | '@') {
                    c
                } else {
                    '_'
                }
            })
            .take(100)
            .collect();
        let id = if id.is_empty() { "_".into() } else { id };
        Channel(Arc::from(format!("{INTERNAL_PREFIX}canary.{id}")))
    }

    /// Whether this is one of fanout's own channels (`_fanout.…`, the canaries' probes):
    /// no client subscribes or publishes there, and the API does not publish there.
    pub fn is_internal(&self) -> bool {
        self.0.starts_with(INTERNAL_PREFIX)
    }

    pub fn is_broadcast(&self) -> bool {
        &*self.0 == BROADCAST
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn validate(name: &str) -> Result<(), ChannelError> {
    if name.is_empty() {
        return Err(ChannelError::Empty);
    }
    let len = name.chars().count();
    if len > MAX_LEN {
        return Err(ChannelError::TooLong(len));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | ':' | '=' | '@' | '.')))
    {
        return Err(ChannelError::InvalidChar(c));
    }
    if name.split('.').any(str::is_empty) {
        return Err(ChannelError::EmptySegment);
    }
    Ok(())
}

impl fmt::Display for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl serde::Serialize for Channel {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl AsRef<str> for Channel {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_valid_names() {
        for name in [
            "maths",
            "room:maths",
            "user@42",
            "a=b",
            "x_y-z",
            "a.b.c",
            "broadcast",
        ] {
            assert_eq!(Channel::parse(name).unwrap().as_str(), name);
        }
        let longest = "a".repeat(MAX_LEN);
        assert!(Channel::parse(&longest).is_ok());
    }

    #[test]
    fn rejects_invalid_names() {
        assert_eq!(Channel::parse(""), Err(ChannelError::Empty));
        assert_eq!(
            Channel::parse(&"a".repeat(129)),
            Err(ChannelError::TooLong(129))
        );
        assert_eq!(Channel::parse("a*"), Err(ChannelError::InvalidChar('*')));
        assert_eq!(Channel::parse("a.>"), Err(ChannelError::InvalidChar('>')));
        assert_eq!(Channel::parse("a b"), Err(ChannelError::InvalidChar(' ')));
        assert_eq!(Channel::parse("a\tb"), Err(ChannelError::InvalidChar('\t')));
        assert_eq!(Channel::parse("é"), Err(ChannelError::InvalidChar('é')));
        assert_eq!(Channel::parse("a/b"), Err(ChannelError::InvalidChar('/')));
        for bad in [".a", "a.", "a..b", "."] {
            assert_eq!(
                Channel::parse(bad),
                Err(ChannelError::EmptySegment),
                "{bad}"
            );
        }
    }

    #[test]
    fn broadcast_is_reserved_name() {
        assert!(Channel::broadcast().is_broadcast());
        assert!(Channel::parse("broadcast").unwrap().is_broadcast());
        assert!(!Channel::parse("maths").unwrap().is_broadcast());
    }
}
