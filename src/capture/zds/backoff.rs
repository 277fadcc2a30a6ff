//! Reconnect backoff for the istio-cni connection (layer L4, pure): exponential from an
//! initial delay, capped, with jitter so that agents restarted together do not reconnect in
//! lock-step.

use std::time::Duration;

/// Capped exponential backoff. The caller supplies the randomness, so the schedule is a pure
/// function of the attempt number and the jitter value (and is tested as a table).
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    /// Starts at `initial`, doubling per attempt up to `max`.
    pub fn new(initial: Duration, max: Duration) -> Self {
        Backoff {
            initial,
            max: max.max(initial),
            attempt: 0,
        }
    }

    /// The delay before attempt `attempt` (0-based) for `jitter` in `[0, 1]`: the exponential
    /// value `initial * 2^attempt`, capped at `max`, scaled into `[50 %, 100 %]` of itself. Never
    /// more than `max`.
    pub fn delay(&self, attempt: u32, jitter: f64) -> Duration {
        let factor = 2u32.checked_pow(attempt.min(31)).unwrap_or(u32::MAX);
        let exponential = self.initial.saturating_mul(factor).min(self.max);
        exponential.mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0))
    }

    /// The next delay, advancing the attempt counter.
    pub fn next_delay(&mut self, jitter: f64) -> Duration {
        let delay = self.delay(self.attempt, jitter);
        self.attempt = self.attempt.saturating_add(1);
        delay
    }

    /// Back to the initial delay (after a connection that worked).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_cap_and_jitter_within_half() {
        let backoff = Backoff::new(Duration::from_millis(10), Duration::from_secs(15));
        let ms = Duration::from_millis;
        let cases = [
            (0, 1.0, ms(10)),
            (0, 0.0, ms(5)),
            (1, 1.0, ms(20)),
            (3, 1.0, ms(80)),
            (3, 0.5, ms(60)),
            (10, 1.0, ms(10_240)),
            (11, 1.0, ms(15_000)),
            (11, 0.0, ms(7_500)),
            (40, 1.0, ms(15_000)),
            (u32::MAX, 1.0, ms(15_000)),
            (2, -3.0, ms(20)),
            (2, 7.0, ms(40)),
        ];
        for (attempt, jitter, expected) in cases {
            assert_eq!(
                backoff.delay(attempt, jitter),
                expected,
                "attempt {attempt}, jitter {jitter}"
            );
        }
    }

    #[test]
    fn next_delay_advances_and_reset_starts_over() {
        let mut backoff = Backoff::new(Duration::from_millis(10), Duration::from_millis(30));
        let delays: Vec<_> = (0..4).map(|_| backoff.next_delay(1.0)).collect();
        let ms = Duration::from_millis;
        assert_eq!(delays, vec![ms(10), ms(20), ms(30), ms(30)]);
        backoff.reset();
        assert_eq!(backoff.next_delay(1.0), ms(10));
    }

    #[test]
    fn a_cap_below_the_initial_delay_is_raised_to_it() {
        let backoff = Backoff::new(Duration::from_secs(1), Duration::from_millis(1));
        assert_eq!(backoff.delay(5, 1.0), Duration::from_secs(1));
    }
}
