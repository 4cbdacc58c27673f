//! Write moderation: under heavy fan-out a core takes its mailbox at most once per window, so
//! lines that arrive close together share one write per worker (sans-IO: time is passed in).
//!
//! Batches are cut naturally (`driver::source`): at light load every upstream read reaches
//! the workers at once, one write per worker per read. Each write costs the kernel about a
//! microsecond on loopback TCP whatever its length (most of it the receiver's wake-up), so
//! when reads come one line at a time to many workers, those writes fill the CPUs: at 10 000
//! lines/s to 100 workers on two vCPUs, the machine is 97–99% busy and every line waits in
//! run queues (p99 about 1.7 ms, the same for Redis and for the ideal fan-out server).
//!
//! So a core counts the writes it *would* make without holding anything back (every batch it
//! takes times the connections it then writes). While that rate is at or above `above` per
//! second it is **engaged**: after a turn that fanned batches out, it leaves its mailbox alone
//! until `window_us` after that turn began. Whatever arrives meanwhile goes out together when
//! the window ends (or at once, if the turn itself took longer than the window, as at max
//! rate). It disengages when the rate falls under half of `above` (hysteresis, so it does not
//! flip on every period). Nothing but the mailbox waits: reads, timers and writes already
//! queued go on during a window, and a line waits at most `window_us` longer than it would
//! have.
//!
//! The rate counts would-be writes, not writes made, so engaging does not lower it: the count
//! is the same whether k batches go out in k turns or in one. Measured in periods of
//! [`PERIOD_US`], so a burst engages it within one period and a quiet core is back to
//! immediate delivery one period after its load went. A turn that wrote nothing (no
//! subscriber of those batches on this core) is not counted and opens no window.
//!
//! A held mailbox can fill ([`CORE_MAILBOX`](crate::server::CORE_MAILBOX) messages in one
//! window, 320 000 upstream reads a second at the default window): the source then holds its
//! reads uncut for every core, as for any core that is behind (`driver::source`, "Batching"),
//! so the batches grow instead.
#[cfg(test)]
use std::time::Duration;

pub(crate) use crate::config::ModerationConfig;

/// The period over which the would-be write rate is measured.
pub(crate) const PERIOD_US: u64 = 10_000;

/// One core's moderation state.
#[derive(Debug)]
pub(crate) struct Moderation {
    above: u64,
    window_us: u64,
    /// Start of the current measuring period (µs, the core clock's).
    period_start_us: u64,
    /// Would-be writes counted in this period.
    count: u64,
    engaged: bool,
    /// While engaged: the mailbox is left alone until then.
    hold_until_us: u64,
    /// Windows opened so far (fan-out turns while engaged), for the core's stats.
    windows: u64,
}

impl Moderation {
    pub(crate) fn new(config: ModerationConfig) -> Self {
        let window_us = u64::try_from(config.window.as_micros()).unwrap_or(u64::MAX);
        Self {
            above: if window_us == 0 { 0 } else { config.above },
            window_us,
            period_start_us: 0,
            count: 0,
            engaged: false,
            hold_until_us: 0,
            windows: 0,
        }
    }

    /// Until when the mailbox must be left alone, if it must at `now_us`.
    pub(crate) fn held(&self, now_us: u64) -> Option<u64> {
        (self.engaged && now_us < self.hold_until_us).then_some(self.hold_until_us)
    }

    /// A turn that began at `now_us` took `batches` batches from the mailbox and then made
    /// `writes` writes: counted, and while engaged a window opens.
    pub(crate) fn fanned_out(&mut self, now_us: u64, batches: u64, writes: u64) {
        // A turn that wrote nothing (a core without subscribers of these batches) fanned
        // nothing out: no write to share, so neither counted nor followed by a window.
        if self.above == 0 || batches == 0 || writes == 0 {
            return;
        }
        self.count = self.count.saturating_add(batches.saturating_mul(writes));
        let elapsed = now_us.saturating_sub(self.period_start_us);
        if elapsed >= PERIOD_US {
            // Per second, over the period just ended (which may have been long and quiet).
            let rate = u128::from(self.count) * 1_000_000 / u128::from(elapsed);
            let stay = if self.engaged { self.above / 2 } else { self.above };
            self.engaged = rate >= u128::from(stay);
            self.period_start_us = now_us;
            self.count = 0;
        }
        if self.engaged {
            self.hold_until_us = now_us.saturating_add(self.window_us);
            self.windows += 1;
        }
    }

    /// Whether moderation is configured at all (a nonzero threshold and window).
    pub(crate) fn is_on(&self) -> bool {
        self.above != 0
    }

    /// Whether the core is moderating its writes.
    pub(crate) fn engaged(&self) -> bool {
        self.engaged
    }

    /// Windows opened so far.
    pub(crate) fn windows(&self) -> u64 {
        self.windows
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn on(above: u64, window_us: u64) -> Moderation {
        Moderation::new(ModerationConfig { above, window: Duration::from_micros(window_us) })
    }

    /// Drives `m` with one batch every `every_us` for `until_us`, each then written to
    /// `writes` connections; returns the last time.
    fn feed(m: &mut Moderation, from_us: u64, until_us: u64, every_us: u64, writes: u64) -> u64 {
        let mut t = from_us;
        while t < until_us {
            if m.held(t).is_none() {
                m.fanned_out(t, 1, writes);
            }
            t += every_us;
        }
        t
    }

    #[test]
    fn light_load_is_never_held() {
        let mut m = on(200_000, 100);
        // 10 000 batches/s to 10 connections: 100 000 would-be writes/s.
        let end = feed(&mut m, 0, 100_000, 100, 10);
        assert!(!m.engaged());
        assert_eq!(m.held(end), None);
    }

    #[test]
    fn heavy_fan_out_engages_within_a_period_and_holds_for_the_window_only() {
        let mut m = on(200_000, 100);
        // 10 000 batches/s to 50 connections: 500 000 would-be writes/s.
        let t = feed(&mut m, 0, 2 * PERIOD_US + 1, 100, 50);
        assert!(m.engaged(), "500 000 would-be writes/s is above 200 000");
        m.fanned_out(t, 1, 50);
        assert_eq!(m.held(t), Some(t + 100));
        assert_eq!(m.held(t + 99), Some(t + 100));
        assert_eq!(m.held(t + 100), None, "the window ends");
    }

    #[test]
    fn holding_does_not_lower_the_rate_that_engaged_it() {
        let mut m = on(200_000, 100);
        let t = feed(&mut m, 0, 2 * PERIOD_US + 1, 100, 50);
        assert!(m.engaged());
        // Engaged, a turn takes every batch that arrived during its window: 3 batches per
        // turn every 300 µs is the same would-be rate as one batch every 100 µs.
        let mut now = t;
        for _ in 0..200 {
            assert!(m.held(now).is_none());
            m.fanned_out(now, 3, 50);
            now += 300;
        }
        assert!(m.engaged(), "the would-be rate is unchanged by coalescing");
    }

    #[test]
    fn it_disengages_below_half_the_threshold_and_not_between() {
        let mut m = on(200_000, 100);
        let t = feed(&mut m, 0, 2 * PERIOD_US + 1, 100, 50);
        assert!(m.engaged());
        // 150 000/s: under the threshold but above half of it: stays engaged.
        let t = feed(&mut m, t, t + 3 * PERIOD_US, 100, 15);
        assert!(m.engaged());
        // 50 000/s: under half.
        let t = feed(&mut m, t, t + 3 * PERIOD_US, 100, 5);
        assert!(!m.engaged());
        assert_eq!(m.held(t), None);
    }

    #[test]
    fn a_quiet_spell_after_heavy_load_disengages_at_the_next_batch() {
        let mut m = on(200_000, 100);
        let t = feed(&mut m, 0, 2 * PERIOD_US + 1, 100, 50);
        assert!(m.engaged());
        // One batch after a second of silence: the period's rate is tiny.
        m.fanned_out(t + 1_000_000, 1, 50);
        assert!(!m.engaged());
        assert_eq!(m.held(t + 1_000_001), None);
    }

    #[test]
    fn off_never_engages() {
        for mut m in [Moderation::new(ModerationConfig::OFF), on(0, 100), on(1, 0)] {
            let t = feed(&mut m, 0, 3 * PERIOD_US, 10, 1000);
            assert!(!m.engaged());
            assert_eq!(m.held(t), None);
        }
    }

    #[test]
    fn turns_without_batches_or_writes_do_not_count() {
        let mut m = on(1, 100);
        m.fanned_out(0, 0, 1000);
        m.fanned_out(PERIOD_US * 2, 0, 1000);
        // A core with no subscriber takes every batch and writes nothing.
        let t = feed(&mut m, PERIOD_US * 3, PERIOD_US * 6, 1, 0);
        assert!(!m.engaged());
        assert_eq!(m.held(t), None);
        assert_eq!(m.windows(), 0);
    }
}
