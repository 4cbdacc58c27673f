//! Reconnect delays: capped exponential backoff with jitter. Pure (the caller seeds the PRNG and
//! owns the timer).
//!
//! The first retry waits about `initial_ms`, each further failure doubles the delay up to
//! `max_ms`, and every delay is moved by up to ±`jitter_percent` so that many hubs restarted
//! together do not dial the master in lockstep. The result never exceeds `max_ms`. After a
//! connection reached `Up`, the driver calls [`Backoff::reset`] and the next failure starts
//! from `initial_ms` again. (Synapse's own client: 0.1 s, ×e, ≈12 % jitter, cap 1 s; replhub
//! retries a little more patiently because one hub stands for many workers.)

/// Backoff settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackoffConfig {
    /// Delay before the first retry.
    pub initial_ms: u64,
    /// Longest delay.
    pub max_ms: u64,
    /// Random spread around each delay, in percent (0–100).
    pub jitter_percent: u64,
}

impl Default for BackoffConfig {
    fn default() -> Self {
        Self { initial_ms: 100, max_ms: 5_000, jitter_percent: 20 }
    }
}

/// Reconnect delay state for one link.
#[derive(Clone, Debug)]
pub(crate) struct Backoff {
    config: BackoffConfig,
    failures: u32,
    rng: u64,
}

impl Backoff {
    /// A backoff with the given settings; `seed` feeds the jitter (any value; e.g. the pid or
    /// the clock, so that hubs differ).
    pub(crate) fn new(config: BackoffConfig, seed: u64) -> Self {
        Self { config, failures: 0, rng: seed }
    }

    /// Failures since the last reset.
    pub(crate) fn failures(&self) -> u32 {
        self.failures
    }

    /// The delay before the next attempt, in ms; counts one more failure.
    pub(crate) fn next_delay_ms(&mut self) -> u64 {
        let shift = self.failures.min(40);
        self.failures = self.failures.saturating_add(1);
        let base = self.config.initial_ms.saturating_mul(1u64 << shift).min(self.config.max_ms);
        let spread = base.saturating_mul(self.config.jitter_percent.min(100)) / 100;
        let jittered = if spread == 0 {
            base
        } else {
            let offset = self.next_random() % (2 * spread + 1);
            (base - spread).saturating_add(offset)
        };
        jittered.min(self.config.max_ms)
    }

    /// A connection reached `Up`: the next failure starts from `initial_ms` again.
    pub(crate) fn reset(&mut self) {
        self.failures = 0;
    }

    /// splitmix64: small, fast, and good enough for jitter.
    fn next_random(&mut self) -> u64 {
        self.rng = self.rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap_within_the_jitter() {
        for seed in 0..50 {
            let mut b = Backoff::new(BackoffConfig::default(), seed);
            let mut base = 100u64;
            for _ in 0..12 {
                let d = b.next_delay_ms();
                assert!(d >= base * 8 / 10 && d <= (base * 12 / 10).min(5_000), "{d} around {base}");
                base = (base * 2).min(5_000);
            }
            assert_eq!(b.failures(), 12);
        }
    }

    #[test]
    fn reset_starts_over_and_jitter_varies() {
        let mut b = Backoff::new(BackoffConfig::default(), 7);
        for _ in 0..5 {
            b.next_delay_ms();
        }
        b.reset();
        assert!(b.next_delay_ms() <= 120);
        let firsts: std::collections::HashSet<u64> =
            (0..32).map(|s| Backoff::new(BackoffConfig::default(), s).next_delay_ms()).collect();
        assert!(firsts.len() > 5, "jitter spreads the first delay: {firsts:?}");
    }

    #[test]
    fn no_jitter_and_huge_failure_counts() {
        let cfg = BackoffConfig { initial_ms: 10, max_ms: 1_000, jitter_percent: 0 };
        let mut b = Backoff::new(cfg, 0);
        let got: Vec<u64> = (0..8).map(|_| b.next_delay_ms()).collect();
        assert_eq!(got, vec![10, 20, 40, 80, 160, 320, 640, 1_000]);
        for _ in 0..200 {
            assert_eq!(b.next_delay_ms(), 1_000);
        }
    }
}
