//! Time: [`Now`], as the sans-IO layers see it (always passed in, never read), and the
//! [`Clock`] that the threads doing I/O read it from.
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// A point in time handed to the sans-IO core by its driver.
///
/// `mono_ms` is a monotonic millisecond counter (only differences matter) used for every
/// timer; `wall_ms` is the wall clock in Unix milliseconds, used only where the protocol puts
/// a timestamp on the wire (`PING <now_ms>`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Now {
    /// Monotonic milliseconds.
    pub mono_ms: u64,
    /// Wall-clock Unix milliseconds.
    pub wall_ms: i64,
}

impl Now {
    /// A time with both clocks at the given values.
    pub const fn new(mono_ms: u64, wall_ms: i64) -> Self {
        Self { mono_ms, wall_ms }
    }

    /// The same instant moved forward by `ms` milliseconds on both clocks.
    #[must_use]
    pub const fn plus_ms(self, ms: u64) -> Self {
        Self { mono_ms: self.mono_ms + ms, wall_ms: self.wall_ms + ms as i64 }
    }
}

/// The process clock: the only place that reads time. Sans-IO layers get [`Now`] from it.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    start: Instant,
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock {
    /// A clock whose monotonic zero is now.
    // The clock is the one place allowed to read the time (clippy.toml).
    #[allow(clippy::disallowed_methods)]
    pub fn new() -> Self {
        Self { start: Instant::now() }
    }

    /// The current time for the sans-IO core.
    #[allow(clippy::disallowed_methods)]
    pub fn now(&self) -> Now {
        let wall_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        Now { mono_ms: u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX), wall_ms }
    }

    /// Monotonic microseconds, on the same zero as [`Now::mono_ms`], for what is timed finer
    /// than the sans-IO timers (a core's write moderation).
    #[allow(clippy::disallowed_methods)]
    pub fn mono_us(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    /// The monotonic instant of `mono_ms`.
    pub fn instant_at(&self, mono_ms: u64) -> Instant {
        self.start + std::time::Duration::from_millis(mono_ms)
    }
}
