//! Exponential backoff with bounded jitter.
//!
//! The n-th retry (1-based) waits `min(base × 2^(n−1), max)` scaled by a uniform factor in
//! `[1 − jitter, 1 + jitter]`, and never more than `max`.

use std::time::Duration;

/// Backoff parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Backoff {
    /// First delay.
    pub base: Duration,
    /// Longest delay (also caps the jittered delay).
    pub max: Duration,
    /// Relative jitter in `[0, 1]`.
    pub jitter: f64,
}

impl Backoff {
    /// The delay before retry `attempt` without jitter.
    pub fn nominal(&self, attempt: u32) -> Duration {
        let factor = 2u32.saturating_pow(attempt.saturating_sub(1).min(31));
        self.base.saturating_mul(factor).min(self.max)
    }

    /// The delay before retry `attempt`, jittered with `unit` drawn uniformly from `[0, 1)`.
    pub fn delay(&self, attempt: u32, unit: f64) -> Duration {
        let nominal = self.nominal(attempt).as_secs_f64();
        let jitter = self.jitter.clamp(0.0, 1.0);
        let factor = 1.0 + jitter * (2.0 * unit.clamp(0.0, 1.0) - 1.0);
        Duration::from_secs_f64((nominal * factor).max(0.0)).min(self.max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nominal_doubles_and_caps() {
        let b = Backoff {
            base: Duration::from_millis(100),
            max: Duration::from_secs(1),
            jitter: 0.0,
        };
        let v: Vec<u128> = (1..=6).map(|n| b.nominal(n).as_millis()).collect();
        assert_eq!(v, [100, 200, 400, 800, 1000, 1000]);
        assert_eq!(b.nominal(1000), Duration::from_secs(1));
    }

    #[test]
    fn jitter_stays_within_its_bounds_and_under_max() {
        let b = Backoff {
            base: Duration::from_millis(100),
            max: Duration::from_millis(700),
            jitter: 0.25,
        };
        assert_eq!(b.delay(1, 0.0), Duration::from_millis(75));
        assert_eq!(b.delay(1, 0.5), Duration::from_millis(100));
        assert_eq!(b.delay(2, 1.0), Duration::from_millis(250));
        assert_eq!(b.delay(4, 1.0), Duration::from_millis(700));
    }
}
