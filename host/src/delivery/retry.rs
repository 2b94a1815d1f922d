//! Retry timing: exponential backoff with jitter, and the retry horizon that
//! dedup TTLs are checked against.

use std::time::Duration;

use crate::manifest::RetryConfig;

/// A handler's retry policy.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    /// Attempts in all.
    pub max_attempts: u32,
    /// Delay after the first failure.
    pub initial_delay: Duration,
    /// Ceiling of every delay, a handler's retry-after included.
    pub max_delay: Duration,
    /// Growth per attempt.
    pub multiplier: f64,
}

impl From<&RetryConfig> for RetryPolicy {
    fn from(c: &RetryConfig) -> Self {
        Self {
            max_attempts: c.max_attempts,
            initial_delay: Duration::from_millis(c.initial_delay_ms),
            max_delay: Duration::from_millis(c.max_delay_ms),
            multiplier: c.multiplier,
        }
    }
}

impl RetryPolicy {
    /// The un-jittered delay after failed attempt `attempt` (1-based).
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let exp = self.multiplier.powi(attempt.saturating_sub(1).min(64) as i32);
        let ms = (self.initial_delay.as_millis() as f64 * exp).min(self.max_delay.as_millis() as f64);
        Duration::from_millis(ms as u64)
    }

    /// The delay before the next attempt after attempt `attempt` failed:
    /// "equal jitter" (half fixed, half random) so synchronized failures
    /// spread out while the delay still grows. A handler's `retry_after`
    /// replaces it, capped at `max_delay`.
    pub fn delay(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        if let Some(after) = retry_after {
            return after.min(self.max_delay);
        }
        let ceiling = self.ceiling(attempt);
        let half = ceiling / 2;
        half + half.mul_f64(rand::random::<f64>())
    }

    /// The longest time from first delivery to the last attempt's end, when
    /// every attempt runs out its `lease` (the worst case: a crash
    /// mid-attempt) and every backoff is at its ceiling. A dedup TTL shorter
    /// than this could forget a message that is still being retried.
    pub fn horizon(&self, timeout: Duration) -> Duration {
        let lease = super::lease_for(timeout);
        let delays: Duration = (1..self.max_attempts).map(|a| self.ceiling(a)).sum();
        delays + lease * self.max_attempts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 4,
            initial_delay: Duration::from_millis(100),
            max_delay: Duration::from_millis(300),
            multiplier: 2.0,
        }
    }

    #[test]
    fn backoff_grows_and_caps() {
        let p = policy();
        assert_eq!(p.ceiling(1), Duration::from_millis(100));
        assert_eq!(p.ceiling(2), Duration::from_millis(200));
        assert_eq!(p.ceiling(3), Duration::from_millis(300));
        assert_eq!(p.ceiling(30), Duration::from_millis(300));
        for attempt in 1..6 {
            let d = p.delay(attempt, None);
            assert!(d >= p.ceiling(attempt) / 2 && d <= p.ceiling(attempt), "{d:?}");
        }
    }

    #[test]
    fn retry_after_wins_but_is_capped() {
        let p = policy();
        assert_eq!(p.delay(1, Some(Duration::from_millis(250))), Duration::from_millis(250));
        assert_eq!(p.delay(1, Some(Duration::from_secs(60))), Duration::from_millis(300));
    }

    #[test]
    fn horizon_counts_every_lease_and_delay() {
        let p = policy();
        let lease = super::super::lease_for(Duration::from_secs(1));
        assert_eq!(
            p.horizon(Duration::from_secs(1)),
            Duration::from_millis(600) + lease * 4
        );
    }
}
