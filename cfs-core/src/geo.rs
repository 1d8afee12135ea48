//! Where hosts sit for a latency model, shared by the simulator (`cfs-sim`) and the
//! testnet's wide-area links (`cfs-lab`), so both place the same seed's hosts alike:
//! points in a unit square, and a round trip that grows with their distance.

use rand::{Rng, SeedableRng};
use std::time::Duration;

/// The position of host (or node) `index` for `seed`: from the seed and the index alone,
/// so it does not depend on the order hosts are made in.
pub fn position(seed: u64, index: u64) -> (f64, f64) {
    let mut r =
        rand::rngs::SmallRng::seed_from_u64(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ index);
    (r.random::<f64>(), r.random::<f64>())
}

/// One-way delay between two positions: half a round trip from `min_rtt` (same place) to
/// `max_rtt` (opposite corners), in whole microseconds.
pub fn one_way(min_rtt: Duration, max_rtt: Duration, a: (f64, f64), b: (f64, f64)) -> Duration {
    let d = ((a.0 - b.0).powi(2) + (a.1 - b.1).powi(2)).sqrt() / std::f64::consts::SQRT_2;
    let min = min_rtt.as_secs_f64();
    let span = (max_rtt.as_secs_f64() - min).max(0.0);
    Duration::from_micros(((min + span * d) * 1e6 / 2.0).round() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_repeat_and_delays_stay_in_range() {
        assert_eq!(position(7, 3), position(7, 3));
        assert_ne!(position(7, 3), position(8, 3));
        let (min, max) = (Duration::from_millis(20), Duration::from_millis(200));
        for i in 0..50 {
            let d = one_way(min, max, position(1, i), position(1, i + 1));
            assert!(d >= min / 2 && d <= max / 2, "{d:?}");
        }
        assert_eq!(one_way(min, max, (0.0, 0.0), (1.0, 1.0)), max / 2);
    }
}
