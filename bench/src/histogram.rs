//! A log-bucket latency histogram: fixed size, cheap to merge, accurate to about 1%.
//!
//! # Implementation
//!
//! Values are microseconds. Values below 64 get one bucket each; above that, every power of two
//! is split into 64 equal sub-buckets, so a bucket is at most 1/64 (1.6%) of its lower bound
//! wide, and reporting its midpoint is off by at most 0.8%. Values are clamped to `u32::MAX` µs
//! (71 minutes), which makes 1728 buckets (14 KiB) per histogram. The exact maximum, sum and
//! count are kept beside the buckets.

use std::time::Duration;

/// Sub-buckets per power of two, as a number of bits.
const SUB_BITS: u32 = 6;
/// Sub-buckets per power of two.
const SUB: usize = 1 << SUB_BITS;
/// Buckets needed for values up to `u32::MAX`.
const BUCKETS: usize = (32 - SUB_BITS as usize + 1) * SUB;

/// Latencies of completed requests, in microseconds.
#[derive(Clone, PartialEq, Eq)]
pub struct Histogram {
    /// Count per bucket; see the module docs for the layout.
    buckets: Box<[u64]>,
    /// Number of values recorded.
    count: u64,
    /// Sum of the (clamped) values, for the mean.
    sum: u64,
    /// Largest value recorded, exact.
    max: u64,
}

impl Histogram {
    /// An empty histogram.
    pub fn new() -> Histogram {
        Histogram {
            buckets: vec![0; BUCKETS].into_boxed_slice(),
            count: 0,
            sum: 0,
            max: 0,
        }
    }

    /// Records one latency.
    pub fn record(&mut self, latency: Duration) {
        let us = u64::try_from(latency.as_micros())
            .map_or(u64::from(u32::MAX), |us| us.min(u64::from(u32::MAX)));
        self.buckets[index(us)] += 1;
        self.count += 1;
        self.sum += us;
        self.max = self.max.max(us);
    }

    /// Adds every value recorded in `other`.
    pub fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.buckets.iter_mut().zip(other.buckets.iter()) {
            *a += b;
        }
        self.count += other.count;
        self.sum += other.sum;
        self.max = self.max.max(other.max);
    }

    /// Number of latencies recorded.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The largest latency recorded (zero when empty).
    pub fn max(&self) -> Duration {
        Duration::from_micros(self.max)
    }

    /// The mean latency (zero when empty).
    pub fn mean(&self) -> Duration {
        Duration::from_micros(self.sum.checked_div(self.count).unwrap_or(0))
    }

    /// The standard deviation of the latencies (each counted at its bucket's midpoint, so to
    /// about 1%; zero when empty).
    pub fn stdev(&self) -> Duration {
        if self.count == 0 {
            return Duration::ZERO;
        }
        let mean = self.sum as f64 / self.count as f64;
        let squares: f64 = (self.buckets.iter().enumerate())
            .filter(|(_, n)| **n > 0)
            .map(|(i, &n)| {
                let d = midpoint(i).min(self.max) as f64 - mean;
                n as f64 * d * d
            })
            .sum();
        Duration::from_micros((squares / self.count as f64).sqrt() as u64)
    }

    /// The latency at quantile `q` (0.5 for the median, 0.99 for p99), to about 1%: the
    /// smallest recorded value such that a fraction `q` of all values are at or below it.
    /// Zero when empty; never above [`Histogram::max`].
    pub fn quantile(&self, q: f64) -> Duration {
        if self.count == 0 {
            return Duration::ZERO;
        }
        // Rank of the wanted value, 1-based: ceil(q * count), at least 1.
        let rank = ((q.clamp(0.0, 1.0) * self.count as f64).ceil() as u64).clamp(1, self.count);
        let mut seen = 0;
        for (i, &n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return Duration::from_micros(midpoint(i).min(self.max));
            }
        }
        Duration::from_micros(self.max)
    }
}

impl Default for Histogram {
    fn default() -> Histogram {
        Histogram::new()
    }
}

impl std::fmt::Debug for Histogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Histogram")
            .field("count", &self.count)
            .field("p50", &self.quantile(0.5))
            .field("p99", &self.quantile(0.99))
            .field("max", &self.max())
            .finish()
    }
}

/// The bucket that holds `us` (at most `u32::MAX`).
fn index(us: u64) -> usize {
    if us < SUB as u64 {
        return us as usize;
    }
    let exp = 63 - us.leading_zeros(); // >= SUB_BITS
    let shift = exp - SUB_BITS;
    // `us >> shift` is in SUB..2*SUB: the leading one and the next SUB_BITS bits.
    (shift as usize + 1) * SUB + ((us >> shift) as usize - SUB)
}

/// The middle of bucket `i`, the value it reports.
fn midpoint(i: usize) -> u64 {
    if i < SUB {
        return i as u64;
    }
    let shift = (i / SUB - 1) as u32;
    let low = ((SUB + i % SUB) as u64) << shift;
    low + (1u64 << shift) / 2
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_contiguous_and_cover_u32() {
        let mut prev = 0;
        for us in [
            0,
            1,
            63,
            64,
            65,
            127,
            128,
            129,
            1000,
            65_535,
            1 << 20,
            u32::MAX as u64,
        ] {
            let i = index(us);
            assert!(i >= prev, "index not monotonic at {us}");
            assert!(i < BUCKETS, "index {i} out of range for {us}");
            prev = i;
        }
        assert_eq!(index(u32::MAX as u64), BUCKETS - 1);
        for us in 0..128 {
            assert_eq!(index(us), us as usize, "small values are exact");
        }
    }

    #[test]
    fn stdev_of_two_values_is_half_their_distance() {
        let mut h = Histogram::new();
        assert_eq!(h.stdev(), Duration::ZERO);
        h.record(Duration::from_micros(10));
        h.record(Duration::from_micros(30));
        assert_eq!(h.stdev(), Duration::from_micros(10));
    }

    #[test]
    fn midpoint_is_within_one_percent() {
        for us in (1..5_000_000u64).step_by(997) {
            let mid = midpoint(index(us));
            let err = (mid as f64 - us as f64).abs() / us as f64;
            assert!(
                err <= 0.0079,
                "{us} reported as {mid} ({:.2}%)",
                err * 100.0
            );
        }
    }

    #[test]
    fn quantiles_of_a_uniform_spread() {
        let mut h = Histogram::new();
        for us in 1..=10_000u64 {
            h.record(Duration::from_micros(us));
        }
        let near = |d: Duration, want: f64| {
            let got = d.as_micros() as f64;
            assert!((got - want).abs() / want < 0.01, "got {got}, want {want}");
        };
        near(h.quantile(0.5), 5_000.0);
        near(h.quantile(0.99), 9_900.0);
        assert_eq!(h.quantile(1.0), Duration::from_micros(10_000));
        assert_eq!(h.max(), Duration::from_micros(10_000));
        assert_eq!(h.count(), 10_000);
        near(h.mean(), 5_000.5);
    }

    #[test]
    fn merge_and_empty() {
        let empty = Histogram::new();
        assert_eq!(empty.quantile(0.5), Duration::ZERO);
        assert_eq!(empty.mean(), Duration::ZERO);
        let mut a = Histogram::new();
        a.record(Duration::from_millis(1));
        let mut b = Histogram::new();
        b.record(Duration::from_secs(2));
        b.record(Duration::from_secs(3));
        a.merge(&b);
        assert_eq!(a.count(), 3);
        assert_eq!(a.max(), Duration::from_secs(3));
        assert_eq!(
            a.quantile(0.0),
            Duration::from_micros(midpoint(index(1000)))
        );
        // Huge values are clamped, not lost.
        a.record(Duration::from_secs(1 << 40));
        assert_eq!(a.max(), Duration::from_micros(u32::MAX as u64));
    }
}
