//! A place in one region's stream, as the node keeps it: the region's index in the top 8
//! bits of a `u64`, the stream sequence in the other 56. With one region (index 0) a mark is
//! the sequence itself. Marks of one region compare like their sequences; marks of different
//! regions are never compared (events of different regions have no order).

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packs_and_raises() {
        assert_eq!(pack(0, 41), 41);
        let m = pack(3, 41);
        assert_eq!((region(m), seq(m)), (3, 41));
        let mut marks = Marks::new();
        raise(&mut marks, pack(1, 5));
        raise(&mut marks, pack(0, 9));
        raise(&mut marks, pack(1, 4));
        raise(&mut marks, pack(1, 7));
        assert_eq!(seq_of(&marks, 1), 7);
        assert_eq!(seq_of(&marks, 0), 9);
        assert_eq!(seq_of(&marks, 2), 0);
    }
}
