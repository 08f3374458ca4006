//! The cursor of an HTTP stream: where a client is on every channel of its stream, so that
//! it can resume on any node (SSE's `Last-Event-ID`, long-polling's `cursor`), stateless.
//!
//! Opaque to clients: base64url (no padding) of a small versioned JSON document,
//! `{"v":1,"e":"<stream epoch>","t":<unix ms>,"c":{"<channel>":<seq>,…},"s":{"<channel>":<seq>,…}}`:
//! `c` holds the channels whose last event the client has (its seq), `s` those where it has
//! seen none yet, with the stream sequence from which it follows them; `t` is when the
//! stream last vouched for these positions (every event and every heartbeat renews it), so
//! that a node can tell a resume within the history window from one beyond it even on a
//! channel whose last event has expired. Positions are stream sequences, which are only
//! comparable within one epoch. A later version can carry one position per region (the
//! reader rejects versions it does not know).

use std::collections::BTreeMap;

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use fanout::Channel;
use serde::{Deserialize, Serialize};

use crate::sink::{ChannelKey, channel_key};

/// The version this build writes and reads.
pub const VERSION: u32 = 1;

/// Longest cursor accepted, encoded (128 channels of 128 characters fit).
pub const MAX_BYTES: usize = 32 * 1024;

/// Where a client is on one channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Position {
    /// It has the channel's events up to this one (a seq of the channel's).
    Event(u64),
    /// It has seen none of the channel's events, and gets every one after this stream
    /// sequence.
    After(u64),
}

impl Position {
    /// The position after the client got event `seq` of the channel.
    pub fn advance(self, seq: u64) -> Position {
        match self {
            Position::After(from) if seq <= from => self,
            Position::Event(last) if seq <= last => self,
            _ => Position::Event(seq),
        }
    }

    /// The stream sequence after which the client wants the channel's events.
    pub fn seq(self) -> u64 {
        match self {
            Position::Event(seq) | Position::After(seq) => seq,
        }
    }
}

/// A stream's position on every channel, in one epoch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cursor {
    pub epoch: String,
    /// When the stream vouched for these positions, unix milliseconds (0: never).
    pub at: u64,
    pub positions: BTreeMap<Channel, Position>,
}

/// Why a cursor cannot be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CursorError {
    #[error("the cursor is longer than {MAX_BYTES} bytes")]
    TooLong,
    #[error("the cursor is not one this server wrote ({0})")]
    Malformed(String),
    #[error("cursor version {0} is not known here (this node reads version {VERSION})")]
    Version(u32),
    #[error("the cursor names an invalid channel: {0}")]
    Channel(String),
}

/// A stream's channels and where it is on each, kept as it writes events (the SSE and
/// long-poll framings).
#[derive(Debug)]
pub struct Positions {
    epoch: String,
    channels: Vec<(ChannelKey, Channel, Option<Position>)>,
}

impl Positions {
    /// In `epoch`, on `channels`, each from where it starts (none: not known yet, and left
    /// out of the cursor until it is).
    pub fn new(epoch: String, channels: &[(Channel, Option<Position>)]) -> Positions {
        Positions {
            epoch,
            channels: channels
                .iter()
                .map(|(channel, position)| {
                    (channel_key(channel.as_str()), channel.clone(), *position)
                })
                .collect(),
        }
    }

    pub fn enter(&mut self, key: ChannelKey, name: &str) {
        if self.channels.iter().any(|(k, _, _)| *k == key) {
            return;
        }
        if let Ok(channel) = Channel::parse(name) {
            self.channels.push((key, channel, None));
        }
    }

    pub fn leave(&mut self, key: ChannelKey) {
        self.channels.retain(|(k, _, _)| *k != key);
    }

    pub fn set(&mut self, key: ChannelKey, position: Position) {
        if let Some((_, _, at)) = self.channels.iter_mut().find(|(k, _, _)| *k == key) {
            *at = Some(position);
        }
    }

    /// The stream got event `seq` of channel `key`.
    pub fn advance(&mut self, key: ChannelKey, seq: u64) {
        if let Some((_, _, at)) = self.channels.iter_mut().find(|(k, _, _)| *k == key) {
            *at = Some(at.map_or(Position::Event(seq), |p| p.advance(seq)));
        }
    }

    /// Where the stream is, on every channel whose position is known, vouched for at `at`
    /// (unix milliseconds).
    pub fn cursor(&self, at: u64) -> Cursor {
        let mut cursor = Cursor::new(self.epoch.clone());
        cursor.at = at;
        cursor.positions = self
            .channels
            .iter()
            .filter_map(|(_, channel, position)| Some((channel.clone(), (*position)?)))
            .collect();
        cursor
    }
}

#[derive(Serialize, Deserialize)]
struct Wire {
    v: u32,
    e: String,
    #[serde(default)]
    t: u64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    c: BTreeMap<String, u64>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    s: BTreeMap<String, u64>,
}

impl Cursor {
    pub fn new(epoch: impl Into<String>) -> Cursor {
        Cursor {
            epoch: epoch.into(),
            at: 0,
            positions: BTreeMap::new(),
        }
    }

    pub fn encode(&self) -> String {
        let mut wire = Wire {
            v: VERSION,
            e: self.epoch.clone(),
            t: self.at,
            c: BTreeMap::new(),
            s: BTreeMap::new(),
        };
        for (channel, position) in &self.positions {
            match position {
                Position::Event(seq) => wire.c.insert(channel.to_string(), *seq),
                Position::After(seq) => wire.s.insert(channel.to_string(), *seq),
            };
        }
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(&wire).expect("a cursor serializes"))
    }

    pub fn decode(text: &str) -> Result<Cursor, CursorError> {
        if text.len() > MAX_BYTES {
            return Err(CursorError::TooLong);
        }
        let json = URL_SAFE_NO_PAD
            .decode(text.trim())
            .map_err(|e| CursorError::Malformed(e.to_string()))?;
        // The version first, so that a newer cursor is named as such.
        #[derive(Deserialize)]
        struct Versioned {
            v: u32,
        }
        let Versioned { v } =
            serde_json::from_slice(&json).map_err(|e| CursorError::Malformed(e.to_string()))?;
        if v != VERSION {
            return Err(CursorError::Version(v));
        }
        let wire: Wire =
            serde_json::from_slice(&json).map_err(|e| CursorError::Malformed(e.to_string()))?;
        let mut cursor = Cursor::new(wire.e);
        cursor.at = wire.t;
        let named = |name: String| {
            Channel::parse(&name).map_err(|e| CursorError::Channel(format!("{name:?}: {e}")))
        };
        for (name, seq) in wire.c {
            cursor.positions.insert(named(name)?, Position::Event(seq));
        }
        for (name, seq) in wire.s {
            cursor.positions.insert(named(name)?, Position::After(seq));
        }
        Ok(cursor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ch(name: &str) -> Channel {
        Channel::parse(name).unwrap()
    }

    #[test]
    fn round_trips_and_is_url_safe() {
        let mut cursor = Cursor::new("18a3f0c2");
        cursor.at = 1_795_295_400_123;
        cursor
            .positions
            .insert(ch("room:maths"), Position::Event(41));
        cursor.positions.insert(ch("art"), Position::After(40));
        let text = cursor.encode();
        assert!(
            text.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'),
            "{text}"
        );
        assert_eq!(Cursor::decode(&text).unwrap(), cursor);
    }

    #[test]
    fn positions_only_move_forward() {
        assert_eq!(Position::After(40).advance(39), Position::After(40));
        assert_eq!(Position::After(40).advance(45), Position::Event(45));
        assert_eq!(Position::Event(45).advance(44), Position::Event(45));
        assert_eq!(Position::Event(45).advance(50), Position::Event(50));
    }

    #[test]
    fn bad_cursors_say_why() {
        let encode = |json: &str| URL_SAFE_NO_PAD.encode(json);
        assert!(matches!(
            Cursor::decode("not base64!"),
            Err(CursorError::Malformed(_))
        ));
        assert!(matches!(
            Cursor::decode(&encode("[1,2]")),
            Err(CursorError::Malformed(_))
        ));
        assert_eq!(
            Cursor::decode(&encode(r#"{"v":2,"e":"x","regions":{}}"#)),
            Err(CursorError::Version(2))
        );
        assert!(matches!(
            Cursor::decode(&encode(r#"{"v":1,"e":"x","c":{"a b":1}}"#)),
            Err(CursorError::Channel(_))
        ));
        assert!(matches!(
            Cursor::decode(&encode(r#"{"v":1,"e":"x","c":{"a":-1}}"#)),
            Err(CursorError::Malformed(_))
        ));
        assert_eq!(
            Cursor::decode(&"x".repeat(MAX_BYTES + 1)),
            Err(CursorError::TooLong)
        );
    }
}
