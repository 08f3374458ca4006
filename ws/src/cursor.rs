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
//! comparable within one epoch.
//!
//! With regions, version 2 keeps one position per region for every channel (sequences of
//! different regions' streams are unrelated): `"c":{"<channel>":{"eu":41,"us":17}}`, and
//! likewise `s`; `e` is the combined epoch of every region's stream. A node with regions
//! reads only version 2, one without only version 1.

use std::collections::BTreeMap;

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use fanout::Channel;
use serde::{Deserialize, Serialize};

use crate::position::{ChannelKey, Mark, Position, Spots, channel_key, mark, set_spot};

/// The version this build writes and reads for one region.
pub const VERSION: u32 = 1;
/// The version with one position per region.
pub const VERSION_REGIONS: u32 = 2;

/// Longest cursor accepted, encoded (128 channels of 128 characters fit).
pub const MAX_BYTES: usize = 32 * 1024;

/// A stream's position on every channel, in one epoch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cursor {
    pub epoch: String,
    /// When the stream vouched for these positions, unix milliseconds (0: never).
    pub at: u64,
    pub positions: BTreeMap<Channel, Spots>,
}

/// Why a cursor cannot be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CursorError {
    #[error("the cursor is longer than {MAX_BYTES} bytes")]
    TooLong,
    #[error("the cursor is not one this server wrote ({0})")]
    Malformed(String),
    #[error("cursor version {0} is not known here (this node reads version {1})")]
    Version(u32, u32),
    #[error("the cursor names region {0:?}, which is not one of this tier's")]
    Region(String),
    #[error("the cursor names an invalid channel: {0}")]
    Channel(String),
}

/// A stream's channels and where it is on each, kept as it writes events (the SSE and
/// long-poll framings).
#[derive(Debug)]
pub struct Positions {
    epoch: String,
    channels: Vec<(ChannelKey, Channel, Spots)>,
    /// The tier's regions, for the cursor's text (none: one region).
    regions: Vec<std::sync::Arc<str>>,
}

impl Positions {
    /// In `epoch`, on `channels`, each from where it starts (none: not known yet, and left
    /// out of the cursor until it is).
    pub fn new(
        epoch: String,
        channels: &[(Channel, Spots)],
        regions: &[std::sync::Arc<str>],
    ) -> Positions {
        Positions {
            epoch,
            regions: regions.to_vec(),
            channels: channels
                .iter()
                .map(|(channel, spots)| {
                    (
                        channel_key(channel.as_str()),
                        channel.clone(),
                        spots.clone(),
                    )
                })
                .collect(),
        }
    }

    pub fn enter(&mut self, key: ChannelKey, name: &str) {
        if self.channels.iter().any(|(k, _, _)| *k == key) {
            return;
        }
        if let Ok(channel) = Channel::parse(name) {
            self.channels.push((key, channel, Spots::new()));
        }
    }

    pub fn leave(&mut self, key: ChannelKey) {
        self.channels.retain(|(k, _, _)| *k != key);
    }

    pub fn set(&mut self, key: ChannelKey, position: Position) {
        if let Some((_, _, spots)) = self.channels.iter_mut().find(|(k, _, _)| *k == key) {
            set_spot(spots, position);
        }
    }

    /// The stream got event `mark` of channel `key`.
    pub fn advance(&mut self, key: ChannelKey, mark: Mark) {
        if let Some((_, _, spots)) = self.channels.iter_mut().find(|(k, _, _)| *k == key) {
            match spots.iter_mut().find(|p| mark::same_region(p.mark(), mark)) {
                Some(p) => *p = p.advance(mark),
                None => spots.push(Position::Event(mark)),
            }
        }
    }

    /// [`Positions::cursor`]'s text.
    pub fn encode(&self, at: u64) -> String {
        self.cursor(at).encode(&self.regions)
    }

    /// Where the stream is, on every channel whose position is known, vouched for at `at`
    /// (unix milliseconds).
    pub fn cursor(&self, at: u64) -> Cursor {
        let mut cursor = Cursor::new(self.epoch.clone());
        cursor.at = at;
        cursor.positions = self
            .channels
            .iter()
            .filter(|(_, _, spots)| !spots.is_empty())
            .map(|(_, channel, spots)| (channel.clone(), spots.clone()))
            .collect();
        cursor
    }
}

#[derive(Serialize, Deserialize)]
struct Wire<P> {
    v: u32,
    e: String,
    #[serde(default)]
    t: u64,
    #[serde(default = "BTreeMap::new", skip_serializing_if = "BTreeMap::is_empty")]
    c: BTreeMap<String, P>,
    #[serde(default = "BTreeMap::new", skip_serializing_if = "BTreeMap::is_empty")]
    s: BTreeMap<String, P>,
}

impl Cursor {
    pub fn new(epoch: impl Into<String>) -> Cursor {
        Cursor {
            epoch: epoch.into(),
            at: 0,
            positions: BTreeMap::new(),
        }
    }

    /// The cursor's text; `regions` are the tier's regions by index (none: one region,
    /// version 1).
    pub fn encode(&self, regions: &[impl AsRef<str>]) -> String {
        let json = if regions.is_empty() {
            let mut wire = Wire::<u64>::new(VERSION, self);
            for (channel, spots) in &self.positions {
                for position in spots {
                    match position {
                        Position::Event(_) => wire.c.insert(channel.to_string(), position.seq()),
                        Position::After(_) => wire.s.insert(channel.to_string(), position.seq()),
                    };
                }
            }
            serde_json::to_vec(&wire)
        } else {
            let mut wire = Wire::<BTreeMap<String, u64>>::new(VERSION_REGIONS, self);
            for (channel, spots) in &self.positions {
                for position in spots {
                    let Some(region) = regions.get(position.region() as usize) else {
                        continue;
                    };
                    let side = match position {
                        Position::Event(_) => &mut wire.c,
                        Position::After(_) => &mut wire.s,
                    };
                    side.entry(channel.to_string())
                        .or_default()
                        .insert(region.as_ref().to_string(), position.seq());
                }
            }
            serde_json::to_vec(&wire)
        };
        URL_SAFE_NO_PAD.encode(json.expect("a cursor serializes"))
    }

    /// Reads a cursor's text; `regions` as for [`Cursor::encode`].
    pub fn decode(text: &str, regions: &[impl AsRef<str>]) -> Result<Cursor, CursorError> {
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
        let expected = match regions.is_empty() {
            true => VERSION,
            false => VERSION_REGIONS,
        };
        if v != expected {
            return Err(CursorError::Version(v, expected));
        }
        let malformed = |e: serde_json::Error| CursorError::Malformed(e.to_string());
        let named = |name: String| {
            Channel::parse(&name).map_err(|e| CursorError::Channel(format!("{name:?}: {e}")))
        };
        let mut cursor = Cursor::new(String::new());
        let put = |cursor: &mut Cursor, channel: Channel, position: Position| {
            set_spot(cursor.positions.entry(channel).or_default(), position);
        };
        if regions.is_empty() {
            let wire: Wire<u64> = serde_json::from_slice(&json).map_err(malformed)?;
            (cursor.epoch, cursor.at) = (wire.e, wire.t);
            for (name, seq) in wire.c {
                put(
                    &mut cursor,
                    named(name)?,
                    Position::Event(mark::pack(0, seq)),
                );
            }
            for (name, seq) in wire.s {
                put(
                    &mut cursor,
                    named(name)?,
                    Position::After(mark::pack(0, seq)),
                );
            }
            return Ok(cursor);
        }
        let wire: Wire<BTreeMap<String, u64>> = serde_json::from_slice(&json).map_err(malformed)?;
        (cursor.epoch, cursor.at) = (wire.e, wire.t);
        let index = |name: &str| {
            regions
                .iter()
                .position(|r| r.as_ref() == name)
                .map(|i| i as u8)
                .ok_or_else(|| CursorError::Region(name.to_string()))
        };
        for (side, entries) in [(true, wire.c), (false, wire.s)] {
            for (name, seqs) in entries {
                let channel = named(name)?;
                for (region, seq) in seqs {
                    let m = mark::pack(index(&region)?, seq);
                    let position = match side {
                        true => Position::Event(m),
                        false => Position::After(m),
                    };
                    put(&mut cursor, channel.clone(), position);
                }
            }
        }
        Ok(cursor)
    }
}

impl<P> Wire<P> {
    fn new(v: u32, cursor: &Cursor) -> Wire<P> {
        Wire {
            v,
            e: cursor.epoch.clone(),
            t: cursor.at,
            c: BTreeMap::new(),
            s: BTreeMap::new(),
        }
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
            .insert(ch("room:maths"), [Position::Event(41)].into());
        cursor
            .positions
            .insert(ch("art"), [Position::After(40)].into());
        let text = cursor.encode(NONE);
        assert!(
            text.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'),
            "{text}"
        );
        assert_eq!(Cursor::decode(&text, NONE).unwrap(), cursor);
    }

    const NONE: &[&str] = &[];
    const REGIONS: &[&str] = &["eu", "us"];

    #[test]
    fn regions_have_positions_of_their_own() {
        let mut cursor = Cursor::new("eu-1.us-2");
        cursor.positions.insert(
            ch("room"),
            Spots::from_slice(&[
                Position::Event(mark::pack(0, 41)),
                Position::After(mark::pack(1, 17)),
            ]),
        );
        let text = cursor.encode(REGIONS);
        let json = String::from_utf8(URL_SAFE_NO_PAD.decode(&text).unwrap()).unwrap();
        assert_eq!(
            json,
            r#"{"v":2,"e":"eu-1.us-2","t":0,"c":{"room":{"eu":41}},"s":{"room":{"us":17}}}"#
        );
        assert_eq!(Cursor::decode(&text, REGIONS).unwrap(), cursor);
        assert_eq!(Cursor::decode(&text, NONE), Err(CursorError::Version(2, 1)));
        let other = URL_SAFE_NO_PAD.encode(r#"{"v":2,"e":"x","c":{"room":{"ap":3}}}"#);
        assert_eq!(
            Cursor::decode(&other, REGIONS),
            Err(CursorError::Region("ap".into()))
        );
    }

    #[test]
    fn bad_cursors_say_why() {
        let encode = |json: &str| URL_SAFE_NO_PAD.encode(json);
        assert!(matches!(
            Cursor::decode("not base64!", NONE),
            Err(CursorError::Malformed(_))
        ));
        assert!(matches!(
            Cursor::decode(&encode("[1,2]"), NONE),
            Err(CursorError::Malformed(_))
        ));
        assert_eq!(
            Cursor::decode(&encode(r#"{"v":3,"e":"x","regions":{}}"#), NONE),
            Err(CursorError::Version(3, 1))
        );
        assert!(matches!(
            Cursor::decode(&encode(r#"{"v":1,"e":"x","c":{"a b":1}}"#), NONE),
            Err(CursorError::Channel(_))
        ));
        assert!(matches!(
            Cursor::decode(&encode(r#"{"v":1,"e":"x","c":{"a":-1}}"#), NONE),
            Err(CursorError::Malformed(_))
        ));
        assert_eq!(
            Cursor::decode(&"x".repeat(MAX_BYTES + 1), NONE),
            Err(CursorError::TooLong)
        );
    }
}
