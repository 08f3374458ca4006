//! The words every layer of the node shares, and nothing else: a connection's id
//! ([`ConnId`]), a channel's key in connections' filters ([`ChannelKey`]), a place in one
//! region's stream ([`mark`]), and where a client is on a channel ([`Position`]). A leaf: it uses no other module of the crate.

/// A connection's id: the `conn` of its `welcome` frame.
pub type ConnId = uuid::Uuid;

/// Identifies a channel in a connection's filters: a hash of its name, computed once per
/// event (and the same in every process: the hasher has fixed keys).
pub type ChannelKey = u64;

pub fn channel_key(channel: &str) -> ChannelKey {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    channel.hash(&mut hasher);
    hasher.finish()
}

/// A place in one region's stream, as the node keeps it: the region's index in the top 8
/// bits of a `u64`, the stream sequence in the other 56. With one region (index 0) a mark is
/// the sequence itself. Marks of one region compare like their sequences; marks of different
/// regions are never compared (events of different regions have no order).
pub mod mark {
    use smallvec::SmallVec;

    pub type Mark = u64;

    const SEQ_BITS: u32 = 56;
    const SEQ: u64 = (1 << SEQ_BITS) - 1;

    pub const fn pack(region: u8, seq: u64) -> Mark {
        ((region as u64) << SEQ_BITS) | (seq & SEQ)
    }

    pub const fn region(mark: Mark) -> u8 {
        (mark >> SEQ_BITS) as u8
    }

    pub const fn seq(mark: Mark) -> u64 {
        mark & SEQ
    }

    pub const fn same_region(a: Mark, b: Mark) -> bool {
        region(a) == region(b)
    }

    /// One mark per region at most (one entry with one region).
    pub type Marks = SmallVec<[Mark; 1]>;

    /// Raises `marks`' entry for `mark`'s region to `mark`, if that is higher (adds it if none).
    pub fn raise(marks: &mut Marks, mark: Mark) {
        match marks.iter_mut().find(|m| same_region(**m, mark)) {
            Some(m) => *m = (*m).max(mark),
            None => marks.push(mark),
        }
    }

    /// The sequence `marks` hold for `region` (0: none).
    pub fn seq_of(marks: &[Mark], region: u8) -> u64 {
        marks
            .iter()
            .find(|m| self::region(**m) == region)
            .map_or(0, |m| seq(*m))
    }
}

pub use mark::{Mark, Marks};

/// Where a client is on one channel, in one region's stream (the region is the mark's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Position {
    /// It has the channel's events up to this one (the mark of an event of the channel's).
    Event(Mark),
    /// It has seen none of the channel's events (of this region), and gets every one after
    /// this stream sequence.
    After(Mark),
}

impl Position {
    /// The position after the client got event `mark` of the channel (of the same region).
    pub fn advance(self, mark: Mark) -> Position {
        match self {
            Position::After(from) if mark <= from => self,
            Position::Event(last) if mark <= last => self,
            _ => Position::Event(mark),
        }
    }

    /// The mark after which the client wants the channel's events.
    pub fn mark(self) -> Mark {
        match self {
            Position::Event(m) | Position::After(m) => m,
        }
    }

    /// The stream sequence after which the client wants the channel's events.
    pub fn seq(self) -> u64 {
        mark::seq(self.mark())
    }

    pub fn region(self) -> u8 {
        mark::region(self.mark())
    }
}

/// A channel's positions: at most one per region.
pub type Spots = smallvec::SmallVec<[Position; 1]>;

/// Sets `spots`' position for `position`'s region.
pub fn set_spot(spots: &mut Spots, position: Position) {
    match spots.iter_mut().find(|p| p.region() == position.region()) {
        Some(p) => *p = position,
        None => spots.push(position),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packs_and_raises() {
        assert_eq!(mark::pack(0, 41), 41);
        let m = mark::pack(3, 41);
        assert_eq!((mark::region(m), mark::seq(m)), (3, 41));
        let mut marks = Marks::new();
        mark::raise(&mut marks, mark::pack(1, 5));
        mark::raise(&mut marks, mark::pack(0, 9));
        mark::raise(&mut marks, mark::pack(1, 4));
        mark::raise(&mut marks, mark::pack(1, 7));
        assert_eq!(mark::seq_of(&marks, 1), 7);
        assert_eq!(mark::seq_of(&marks, 0), 9);
        assert_eq!(mark::seq_of(&marks, 2), 0);
    }

    #[test]
    fn positions_only_move_forward() {
        assert_eq!(Position::After(40).advance(39), Position::After(40));
        assert_eq!(Position::After(40).advance(45), Position::Event(45));
        assert_eq!(Position::Event(45).advance(44), Position::Event(45));
        assert_eq!(Position::Event(45).advance(50), Position::Event(50));
    }
}
