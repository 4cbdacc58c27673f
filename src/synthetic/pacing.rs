//! Pacing: how many lines are due, as a token bucket on the monotonic clock.
use crate::time::Now;

/// How many lines [`Synthetic::due`](super::Synthetic::due) offers per call when the rate is 0
/// (unpaced).
pub(crate) const UNPACED_BATCH: usize = 4096;

/// A token bucket that holds at most one second's worth of lines, counted in thousandths of a
/// line so that rates below 1000/s accumulate exactly.
#[derive(Debug)]
pub(super) struct Pacer {
    /// Lines per second; 0 = unpaced.
    rate: u64,
    /// Credit, in thousandths of a line (negative after lines that completed a batch run).
    credit_milli: i128,
    /// The latest `mono_ms` seen; `None` until the first [`Self::due`].
    last_ms: Option<u64>,
}

impl Pacer {
    pub(super) fn new(rate: u64) -> Self {
        Self { rate, credit_milli: 0, last_ms: None }
    }

    /// Lines due at `now`; the first call starts the clock (and returns 0). A clock that steps
    /// back adds nothing. With rate 0, always [`UNPACED_BATCH`].
    pub(super) fn due(&mut self, now: Now) -> usize {
        let rate = self.rate;
        if rate == 0 {
            return UNPACED_BATCH;
        }
        let cap = i128::from(rate) * 1000;
        if let Some(last) = self.last_ms {
            let dt = now.mono_ms.saturating_sub(last);
            self.credit_milli = (self.credit_milli + i128::from(dt) * i128::from(rate)).min(cap);
        }
        self.last_ms = Some(self.last_ms.map_or(now.mono_ms, |l| l.max(now.mono_ms)));
        usize::try_from((self.credit_milli / 1000).max(0)).unwrap_or(usize::MAX)
    }

    /// Takes `lines` written from the bucket (it may go below zero: those are paid back
    /// before anything more is due).
    pub(super) fn spend(&mut self, lines: usize) {
        if self.rate > 0 {
            self.credit_milli -= lines as i128 * 1000;
        }
    }
}
