//! A token bucket in exact integer arithmetic: tokens are counted in nano-bytes, so no fraction
//! of a byte earned between two requests is lost to rounding.

use std::time::{Duration, Instant};

use crate::config::RateLimit;

const NANOS_PER_SEC: u128 = 1_000_000_000;
/// A paused queue is woken at most this many times per second, each time for at least
/// `bytes_per_sec / WAKEUPS_PER_SEC` bytes.
const WAKEUPS_PER_SEC: u64 = 100;

#[derive(Debug)]
pub struct TokenBucket {
    limit: RateLimit,
    nano_tokens: u128,
    refilled_at: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(limit: RateLimit, now: Instant) -> Self {
        TokenBucket {
            limit,
            nano_tokens: u128::from(limit.burst) * NANOS_PER_SEC,
            refilled_at: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.refilled_at).as_nanos();
        self.refilled_at = self.refilled_at.max(now);
        let cap = u128::from(self.limit.burst) * NANOS_PER_SEC;
        self.nano_tokens = self
            .nano_tokens
            .saturating_add(elapsed.saturating_mul(u128::from(self.limit.bytes_per_sec)))
            .min(cap);
    }

    /// Whole bytes that may be sent at `now`.
    pub fn available(&mut self, now: Instant) -> u64 {
        self.refill(now);
        (self.nano_tokens / NANOS_PER_SEC) as u64
    }

    /// Spends `bytes`, which must not exceed what `available` returned.
    pub fn consume(&mut self, bytes: u64) {
        self.nano_tokens = self
            .nano_tokens
            .saturating_sub(u128::from(bytes) * NANOS_PER_SEC);
    }

    /// How long until enough bytes have accumulated to be worth waking up for.
    pub fn time_to_refill(&mut self, now: Instant) -> Duration {
        self.refill(now);
        let wanted = (self.limit.bytes_per_sec / WAKEUPS_PER_SEC).clamp(1, self.limit.burst);
        let deficit = (u128::from(wanted) * NANOS_PER_SEC).saturating_sub(self.nano_tokens);
        let nanos = deficit.div_ceil(u128::from(self.limit.bytes_per_sec));
        Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX)).max(Duration::from_nanos(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bursts_then_refills_at_the_rate() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(
            RateLimit {
                bytes_per_sec: 1000,
                burst: 100,
            },
            start,
        );
        assert_eq!(bucket.available(start), 100);
        bucket.consume(100);
        assert_eq!(bucket.available(start), 0);
        // 10 ms earn 10 bytes, which is also the wake-up granule (1000 / 100).
        assert_eq!(bucket.time_to_refill(start), Duration::from_millis(10));
        assert_eq!(bucket.available(start + Duration::from_millis(10)), 10);
        // Fractions carry over: 1.5 ms twice makes 3 bytes, not 2.
        bucket.consume(10);
        let t = start + Duration::from_millis(10);
        assert_eq!(bucket.available(t + Duration::from_micros(1500)), 1);
        assert_eq!(bucket.available(t + Duration::from_micros(3000)), 3);
        // Never more than the burst.
        assert_eq!(bucket.available(t + Duration::from_secs(60)), 100);
    }

    #[test]
    fn slow_rates_wake_for_one_byte() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(RateLimit::per_second(1), start);
        bucket.consume(1);
        assert_eq!(bucket.time_to_refill(start), Duration::from_secs(1));
    }
}
