//! The per-agent circuit breaker.
//!
//! Closed → (after `threshold` consecutive failures) Open → (once `open_duration` has
//! passed, the next recovery is admitted as a probe) HalfOpen → Closed on a success, or
//! Open again (for another `open_duration`) on a failure.

use std::time::Duration;

use tokio::time::Instant;

/// The state of one agent's breaker, as reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CircuitState {
    /// Recovery runs freely.
    Closed,
    /// Recovery is held back for `remaining`.
    Open {
        /// Time left before a probe is admitted.
        remaining: Duration,
    },
    /// One probe is admitted; its outcome closes or re-opens the breaker.
    HalfOpen,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Closed,
    Open { until: Instant },
    HalfOpen,
}

/// One agent's breaker.
#[derive(Clone, Debug)]
pub(crate) struct Breaker {
    phase: Phase,
    consecutive_failures: u32,
    opened: u32,
}

impl Breaker {
    pub(crate) fn new() -> Self {
        Self {
            phase: Phase::Closed,
            consecutive_failures: 0,
            opened: 0,
        }
    }

    /// Records a failure; true when this failure opened the breaker.
    pub(crate) fn on_failure(&mut self, now: Instant, threshold: u32, open_for: Duration) -> bool {
        self.consecutive_failures = self.consecutive_failures.saturating_add(1);
        match self.phase {
            Phase::Closed if self.consecutive_failures >= threshold => {
                self.phase = Phase::Open {
                    until: now + open_for,
                };
                self.opened += 1;
                true
            }
            Phase::HalfOpen => {
                self.phase = Phase::Open {
                    until: now + open_for,
                };
                self.opened += 1;
                true
            }
            _ => false,
        }
    }

    /// Records a success: the breaker closes.
    pub(crate) fn on_success(&mut self) {
        self.phase = Phase::Closed;
        self.consecutive_failures = 0;
    }

    /// How long recovery must wait now. When the open period has passed the breaker turns
    /// half-open and the caller's recovery is the probe.
    pub(crate) fn admit(&mut self, now: Instant) -> Option<Duration> {
        match self.phase {
            Phase::Open { until } if until > now => Some(until - now),
            Phase::Open { .. } => {
                self.phase = Phase::HalfOpen;
                None
            }
            Phase::Closed | Phase::HalfOpen => None,
        }
    }

    pub(crate) fn state(&self, now: Instant) -> CircuitState {
        match self.phase {
            Phase::Closed => CircuitState::Closed,
            Phase::Open { until } => CircuitState::Open {
                remaining: until.saturating_duration_since(now),
            },
            Phase::HalfOpen => CircuitState::HalfOpen,
        }
    }

    pub(crate) fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures
    }

    pub(crate) fn times_opened(&self) -> u32 {
        self.opened
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_at_threshold_half_opens_after_the_period_and_closes_on_success() {
        let t0 = Instant::now();
        let open = Duration::from_secs(5);
        let mut b = Breaker::new();
        assert!(!b.on_failure(t0, 3, open));
        assert!(!b.on_failure(t0, 3, open));
        assert_eq!(b.state(t0), CircuitState::Closed);
        assert!(b.on_failure(t0, 3, open));
        assert_eq!(
            b.admit(t0 + Duration::from_secs(2)),
            Some(Duration::from_secs(3))
        );
        assert!(matches!(b.state(t0), CircuitState::Open { .. }));
        assert_eq!(b.admit(t0 + open), None);
        assert_eq!(b.state(t0 + open), CircuitState::HalfOpen);
        b.on_success();
        assert_eq!(b.state(t0 + open), CircuitState::Closed);
        assert_eq!(b.consecutive_failures(), 0);
    }

    #[test]
    fn a_failed_probe_reopens_for_another_period() {
        let t0 = Instant::now();
        let open = Duration::from_secs(5);
        let mut b = Breaker::new();
        assert!(b.on_failure(t0, 1, open));
        assert_eq!(b.admit(t0 + open), None);
        let t1 = t0 + open + Duration::from_secs(1);
        assert!(b.on_failure(t1, 1, open));
        assert_eq!(b.state(t1), CircuitState::Open { remaining: open });
        assert_eq!(b.times_opened(), 2);
    }
}
