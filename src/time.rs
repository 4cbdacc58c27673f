//! Time as the sans-IO layers see it: always passed in, never read.

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
