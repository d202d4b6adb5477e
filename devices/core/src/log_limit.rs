//! Log lines a guest can provoke at will, limited so a misbehaving driver cannot flood the log.

use std::fmt;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Lets one message through per interval and counts the ones it holds back.
pub struct LogLimiter {
    target: &'static str,
    interval: Duration,
    state: Mutex<LimiterState>,
}

struct LimiterState {
    last: Option<Instant>,
    suppressed: u64,
}

impl LogLimiter {
    /// `target` is the log target the lines carry, normally the caller's `module_path!()`.
    pub const fn new(target: &'static str, interval: Duration) -> Self {
        LogLimiter {
            target,
            interval,
            state: Mutex::new(LimiterState {
                last: None,
                suppressed: 0,
            }),
        }
    }

    /// Logs `message` at warning level unless one was logged less than an interval ago.
    pub fn warn(&self, message: fmt::Arguments<'_>) {
        if let Some(suppressed) = self.admit(Instant::now()) {
            if suppressed > 0 {
                log::warn!(target: self.target, "{message} ({suppressed} similar messages suppressed)");
            } else {
                log::warn!(target: self.target, "{message}");
            }
        }
    }

    /// `Some(number held back since the last one)` if a message may be logged at `now`.
    fn admit(&self, now: Instant) -> Option<u64> {
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if state
            .last
            .is_some_and(|last| now.saturating_duration_since(last) < self.interval)
        {
            state.suppressed += 1;
            return None;
        }
        state.last = Some(now);
        Some(std::mem::take(&mut state.suppressed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_message_per_interval_with_a_count_of_the_rest() {
        let limiter = LogLimiter::new("test", Duration::from_secs(1));
        let start = Instant::now();
        assert_eq!(limiter.admit(start), Some(0));
        assert_eq!(limiter.admit(start + Duration::from_millis(10)), None);
        assert_eq!(limiter.admit(start + Duration::from_millis(20)), None);
        assert_eq!(limiter.admit(start + Duration::from_secs(2)), Some(2));
    }
}
