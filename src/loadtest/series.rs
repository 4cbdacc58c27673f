//! Deliveries over time: how many lines the subscribers received in each interval of a run,
//! for the report's `deliveries_per_interval` and the plot of deliveries/s.
//!
//! The controller samples the subscribers' counters (a sum of relaxed atomics) only when an
//! interval boundary has passed, from the loop it already runs while the publisher works and
//! while the last lines drain. It wakes every few milliseconds, so a sample lands a little
//! after its boundary; on a busy machine it may miss several. The count at each boundary is
//! then interpolated between the two samples around it: the series always has one point per
//! interval and its sum is the total delivered.

/// The interval a run starts with.
pub(super) const INTERVAL_NS: u64 = 100_000_000;
/// Past this many intervals, neighbours are merged in pairs and the interval doubles, so that
/// an hour-long run still makes a short series.
const MAX_POINTS: usize = 1000;

/// Deliveries per interval since `start_ns` (the load test's clock).
#[derive(Clone, Debug)]
pub(super) struct RateSeries {
    start_ns: u64,
    interval_ns: u64,
    counts: Vec<u64>,
    /// The cumulative count at the last boundary pushed.
    at_boundary: u64,
    /// The last sample: time and cumulative count.
    last: (u64, u64),
}

impl RateSeries {
    /// An empty series starting at `start_ns`, when the count was `start_count`.
    pub(super) fn new(start_ns: u64, interval_ns: u64, start_count: u64) -> Self {
        Self {
            start_ns,
            interval_ns: interval_ns.max(1),
            counts: Vec::new(),
            at_boundary: start_count,
            last: (start_ns, start_count),
        }
    }

    /// The end of the interval being counted.
    fn next_boundary(&self) -> u64 {
        self.start_ns + (self.counts.len() as u64 + 1) * self.interval_ns
    }

    /// Whether a boundary has passed since the last sample (then call [`Self::sample`]).
    pub(super) fn due(&self, now_ns: u64) -> bool {
        now_ns >= self.next_boundary()
    }

    /// Records the cumulative count at `now_ns`, closing every interval that ended by then.
    pub(super) fn sample(&mut self, now_ns: u64, count: u64) {
        let (t0, c0) = self.last;
        let (now_ns, count) = (now_ns.max(t0), count.max(c0));
        while self.next_boundary() <= now_ns {
            let b = self.next_boundary();
            // The count at the boundary, on the straight line between the two samples.
            let part = u128::from(count - c0) * u128::from(b - t0) / u128::from((now_ns - t0).max(1));
            let at = c0 + u64::try_from(part).unwrap_or(count - c0);
            self.counts.push(at - self.at_boundary);
            self.at_boundary = at;
            if self.counts.len() >= MAX_POINTS {
                self.halve();
            }
        }
        self.last = (now_ns, count);
    }

    /// Merges neighbouring intervals in pairs and doubles the interval.
    fn halve(&mut self) {
        self.counts = self.counts.chunks(2).map(|p| p.iter().sum()).collect();
        self.interval_ns *= 2;
    }

    /// Closes the series at `now_ns`: the last, partial interval (if any time passed since the
    /// last boundary) holds what arrived since. Returns the interval and the counts.
    pub(super) fn finish(mut self, now_ns: u64, count: u64) -> (u64, Vec<u64>) {
        self.sample(now_ns, count);
        let (t, c) = self.last;
        if t > self.start_ns + self.counts.len() as u64 * self.interval_ns {
            self.counts.push(c - self.at_boundary);
        }
        (self.interval_ns, self.counts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    #[test]
    fn one_point_per_interval_and_the_sum_is_the_total() {
        let mut s = RateSeries::new(0, 100 * MS, 0);
        // 1000 deliveries per ms, sampled 2 ms late each time, for 1.05 s.
        let mut t = 0;
        while t < 1050 * MS {
            t += 2 * MS;
            if s.due(t) {
                s.sample(t, t / MS * 1000);
            }
        }
        let (interval, counts) = s.finish(1050 * MS, 1_050_000);
        assert_eq!(interval, 100 * MS);
        assert_eq!(counts.len(), 11, "ten whole intervals and half of one: {counts:?}");
        assert_eq!(counts.iter().sum::<u64>(), 1_050_000);
        assert!(counts[..10].iter().all(|&c| c == 100_000), "{counts:?}");
        assert_eq!(counts[10], 50_000);
    }

    #[test]
    fn a_late_sample_is_spread_over_the_intervals_it_missed() {
        let mut s = RateSeries::new(10 * MS, 100 * MS, 7);
        assert!(!s.due(109 * MS));
        assert!(s.due(110 * MS));
        // Nothing sampled for 400 ms, then 4000 more lines: 1000 per interval.
        s.sample(410 * MS, 4007);
        let (_, counts) = s.finish(410 * MS, 4007);
        assert_eq!(counts, [1000, 1000, 1000, 1000]);
    }

    #[test]
    fn a_long_run_is_compacted() {
        let mut s = RateSeries::new(0, MS, 0);
        for i in 1..=2500u64 {
            s.sample(i * MS, i);
        }
        let (interval, counts) = s.finish(2500 * MS, 2500);
        // 1000 points merged into 500 of 2 ms, then again into 500 of 4 ms at 2000 ms.
        assert_eq!(interval, 4 * MS);
        assert_eq!(counts.len(), 625);
        assert!(counts.iter().all(|&c| c == 4), "{counts:?}");
    }
}
