//! How evictions are logged: a crowd of workers that stopped reading together is evicted
//! together (a thousand in one sweep), and a WARN line each would flood the log and cost the
//! core the time to format them while the healthy workers wait. So the first few evictions of
//! an episode are logged in full, each naming its worker, and the rest only counted, one line
//! per interval; each eviction is also in the `evictions` counters, whatever is logged.

/// Evictions logged in full per interval.
pub(super) const EVICT_LOG_BURST: u32 = 5;
/// How often the evictions not logged in full are summed up in one line (ms).
pub(super) const EVICT_LOG_INTERVAL_MS: u64 = 10_000;

/// What to log for one eviction.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum EvictLog {
    /// Log it in full.
    Full,
    /// Count it only: [`EvictLogLimit::due`] reports it later.
    Counted,
}

/// Rate limit for the eviction WARNs. Time is passed in.
#[derive(Debug, Default)]
pub(super) struct EvictLogLimit {
    /// Start of the current interval, if an eviction opened one.
    since_ms: Option<u64>,
    /// Evictions logged in full in this interval.
    logged: u32,
    /// Evictions counted and not yet reported.
    counted: u64,
}

impl EvictLogLimit {
    /// An eviction at `now_ms`.
    pub(super) fn evicted(&mut self, now_ms: u64) -> EvictLog {
        match self.since_ms {
            Some(since) if now_ms.saturating_sub(since) < EVICT_LOG_INTERVAL_MS => {}
            // A new interval: an earlier one's count must have been reported by `due` first.
            _ => {
                self.since_ms = Some(now_ms);
                self.logged = 0;
            }
        }
        if self.logged < EVICT_LOG_BURST {
            self.logged += 1;
            EvictLog::Full
        } else {
            self.counted += 1;
            EvictLog::Counted
        }
    }

    /// At `now_ms`: the evictions counted but not logged, and over how long (ms), once their
    /// interval is over.
    pub(super) fn due(&mut self, now_ms: u64) -> Option<(u64, u64)> {
        let since = self.since_ms?;
        let over_ms = now_ms.saturating_sub(since);
        if over_ms < EVICT_LOG_INTERVAL_MS {
            return None;
        }
        self.since_ms = None;
        self.logged = 0;
        let counted = std::mem::take(&mut self.counted);
        (counted > 0).then_some((counted, over_ms))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_crowd_evicted_at_once_logs_a_few_lines_then_one_count() {
        let mut limit = EvictLogLimit::default();
        let logged: Vec<EvictLog> = (0..1000).map(|_| limit.evicted(5_000)).collect();
        assert_eq!(logged.iter().filter(|l| **l == EvictLog::Full).count(), EVICT_LOG_BURST as usize);
        assert!(
            logged[..EVICT_LOG_BURST as usize].iter().all(|l| *l == EvictLog::Full),
            "the first ones in full"
        );
        assert_eq!(limit.due(5_100), None, "the interval is not over");
        assert_eq!(limit.due(15_000), Some((1000 - u64::from(EVICT_LOG_BURST), 10_000)));
        assert_eq!(limit.due(40_000), None, "reported once");
    }

    #[test]
    fn evictions_spread_out_are_each_logged_in_full() {
        let mut limit = EvictLogLimit::default();
        for k in 0..20u64 {
            let now = k * EVICT_LOG_INTERVAL_MS / 4;
            assert_eq!(limit.due(now), None, "nothing was counted");
            assert_eq!(limit.evicted(now), EvictLog::Full, "eviction {k}");
        }
    }

    #[test]
    fn a_new_episode_after_the_report_is_logged_in_full_again() {
        let mut limit = EvictLogLimit::default();
        for _ in 0..10 {
            limit.evicted(0);
        }
        assert_eq!(limit.due(10_000), Some((10 - u64::from(EVICT_LOG_BURST), 10_000)));
        assert_eq!(limit.evicted(10_500), EvictLog::Full);
    }
}
