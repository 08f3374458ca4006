//! A latency histogram in microseconds with three significant digits (0.1–1% error), small
//! enough to merge across worker processes: values are kept as (mantissa < 1000, exponent).

use serde::{Deserialize, Serialize};

const EXPONENTS: usize = 8; // up to 10^8 µs: 100 s

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Histogram {
    /// Sparse on the wire: (bucket, count).
    counts: Vec<u64>,
    pub total: u64,
    pub max: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: vec![0; 1000 * EXPONENTS],
            total: 0,
            max: 0,
        }
    }
}

fn bucket(mut value: u64) -> usize {
    let mut exponent = 0;
    while value >= 1000 && exponent < EXPONENTS - 1 {
        value /= 10;
        exponent += 1;
    }
    exponent * 1000 + value.min(999) as usize
}

fn value_of(bucket: usize) -> u64 {
    (bucket % 1000) as u64 * 10u64.pow((bucket / 1000) as u32)
}

impl Histogram {
    pub fn record(&mut self, micros: u64) {
        self.counts[bucket(micros)] += 1;
        self.total += 1;
        self.max = self.max.max(micros);
    }

    pub fn merge(&mut self, other: &Histogram) {
        for (mine, theirs) in self.counts.iter_mut().zip(&other.counts) {
            *mine += theirs;
        }
        self.total += other.total;
        self.max = self.max.max(other.max);
    }

    /// The value at quantile `q` (0..=1), in milliseconds; NaN when empty.
    pub fn quantile_ms(&self, q: f64) -> f64 {
        if self.total == 0 {
            return f64::NAN;
        }
        if q >= 1.0 {
            return self.max as f64 / 1000.0;
        }
        let rank = ((self.total as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, count) in self.counts.iter().enumerate() {
            seen += count;
            if seen >= rank {
                return value_of(i) as f64 / 1000.0;
            }
        }
        self.max as f64 / 1000.0
    }

    /// For the wire: only the non-empty buckets.
    pub fn sparse(&self) -> Vec<(u32, u64)> {
        self.counts
            .iter()
            .enumerate()
            .filter(|(_, c)| **c > 0)
            .map(|(i, c)| (i as u32, *c))
            .collect()
    }

    pub fn from_sparse(buckets: &[(u32, u64)], max: u64) -> Histogram {
        let mut h = Histogram::default();
        for &(i, c) in buckets {
            h.counts[i as usize] += c;
            h.total += c;
        }
        h.max = max;
        h
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_close() {
        let mut h = Histogram::default();
        for v in 1..=100_000u64 {
            h.record(v);
        }
        let p50 = h.quantile_ms(0.5);
        assert!((p50 - 50.0).abs() / 50.0 < 0.01, "{p50}");
        let p99 = h.quantile_ms(0.99);
        assert!((p99 - 99.0).abs() / 99.0 < 0.01, "{p99}");
        assert_eq!(h.quantile_ms(1.0), 100.0);
        let back = Histogram::from_sparse(&h.sparse(), h.max);
        assert_eq!(back.quantile_ms(0.5), p50);
    }
}
