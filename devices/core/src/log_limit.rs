//! Log lines a guest can provoke at will, limited so a misbehaving driver cannot flood the log.

use std::fmt;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Lets a burst of messages through per interval (one, unless set otherwise) and counts the
/// ones it holds back; the count is added to the next message let through.
pub struct LogLimiter {
    target: &'static str,
    interval: Duration,
    burst: u32,
    state: Mutex<LimiterState>,
}

struct LimiterState {
    /// When the current interval began: at the first message let through after the last one
    /// ended.
    window_start: Option<Instant>,
    /// Messages let through in the current interval.
    admitted: u32,
    suppressed: u64,
}

impl LogLimiter {
    /// One message per `interval`. `target` is the log target the lines carry, normally the
    /// caller's `module_path!()`.
    pub const fn new(target: &'static str, interval: Duration) -> Self {
        Self::with_burst(target, interval, 1)
    }

    /// Up to `burst` messages per `interval`.
    pub const fn with_burst(target: &'static str, interval: Duration, burst: u32) -> Self {
        LogLimiter {
            target,
            interval,
            burst,
            state: Mutex::new(LimiterState {
                window_start: None,
                admitted: 0,
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
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let in_window = state
            .window_start
            .is_some_and(|start| now.saturating_duration_since(start) < self.interval);
        if !in_window {
            state.window_start = Some(now);
            state.admitted = 0;
        }
        if state.admitted >= self.burst {
            state.suppressed += 1;
            return None;
        }
        state.admitted += 1;
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

    #[test]
    fn a_burst_per_interval() {
        let limiter = LogLimiter::with_burst("test", Duration::from_secs(1), 3);
        let start = Instant::now();
        let at = |ms| start + Duration::from_millis(ms);
        assert_eq!(limiter.admit(at(0)), Some(0));
        assert_eq!(limiter.admit(at(1)), Some(0));
        assert_eq!(limiter.admit(at(2)), Some(0));
        assert_eq!(limiter.admit(at(3)), None);
        assert_eq!(limiter.admit(at(999)), None);
        assert_eq!(limiter.admit(at(1000)), Some(2));
        assert_eq!(limiter.admit(at(1001)), Some(0));
    }
}
