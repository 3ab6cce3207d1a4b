//! Exponential backoff with full jitter: `random(0, min(cap, base * 2^n))`.
//! The random source can be seeded, so tests see the same waits every run.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// A lock-free, seedable random source (SplitMix64).
#[derive(Debug)]
pub struct Jitter {
    state: AtomicU64,
}

impl Jitter {
    pub fn new(seed: Option<u64>) -> Jitter {
        let seed = seed.unwrap_or_else(|| {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0x5eed);
            t ^ (std::process::id() as u64).rotate_left(32)
        });
        Jitter {
            state: AtomicU64::new(seed),
        }
    }

    /// A uniform value in `[0, 1)`.
    pub fn next_unit(&self) -> f64 {
        let mut z = self
            .state
            .fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed)
            .wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }

    /// The wait before retry number `retry` (0-based).
    pub fn backoff(&self, base: Duration, cap: Duration, retry: u32) -> Duration {
        let exp = base.saturating_mul(1u32.checked_shl(retry.min(31)).unwrap_or(u32::MAX));
        exp.min(cap).mul_f64(self.next_unit())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_jitter_within_bounds_and_seeded() {
        let a = Jitter::new(Some(7));
        let b = Jitter::new(Some(7));
        let base = Duration::from_millis(200);
        let cap = Duration::from_secs(5);
        for n in 0..10 {
            let wa = a.backoff(base, cap, n);
            assert_eq!(wa, b.backoff(base, cap, n), "same seed, same waits");
            assert!(wa <= (base * 2u32.pow(n)).min(cap));
        }
        let spread: Vec<f64> = (0..1000).map(|_| a.next_unit()).collect();
        let mean = spread.iter().sum::<f64>() / 1000.0;
        assert!((0.4..0.6).contains(&mean), "{mean}");
    }
}
