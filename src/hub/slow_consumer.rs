//! The slow-consumer rule (ARCHITECTURE.md invariant 4), as a pure function of what the hub
//! knows about one connection, so that [`Hub::sweep`](super::Hub) only gathers the inputs.
use super::stats::EvictReason;
use super::HubConfig;

/// Which rules a sweep applies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Rules {
    /// Only the backlog rule: a batch just grew the log (the timer applies the other rule).
    BacklogOnly,
    /// Both rules: the periodic sweep.
    All,
}

/// What to do with a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Verdict {
    /// It keeps up (or is given more time).
    Keep,
    /// Evict it, for this reason.
    Evict(EvictReason),
}

/// The verdict on a connection that holds `backlog_bytes` of log, last made write progress at
/// `progress_ms`, and has a write waiting on its socket (`waits_on_socket`) or not.
///
/// The backlog rule comes first: over `max_pending_bytes` is an eviction whatever the socket
/// does. A connection with no write waiting (nothing to send, or not yet gathered) is never
/// evicted for time: the write timeout measures a socket that does not drain.
pub(super) fn slow_consumer_verdict(
    backlog_bytes: u64,
    progress_ms: u64,
    now_ms: u64,
    waits_on_socket: bool,
    rules: Rules,
    cfg: &HubConfig,
) -> Verdict {
    if backlog_bytes > cfg.max_pending_bytes {
        Verdict::Evict(EvictReason::Backlog)
    } else if rules == Rules::All
        && waits_on_socket
        && now_ms.saturating_sub(progress_ms) >= cfg.write_timeout_ms
    {
        Verdict::Evict(EvictReason::WriteTimeout)
    } else {
        Verdict::Keep
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> HubConfig {
        HubConfig { max_pending_bytes: 1000, write_timeout_ms: 500, ..HubConfig::default() }
    }

    #[test]
    fn backlog_over_the_limit_is_evicted_whatever_the_socket_does() {
        let cfg = cfg();
        assert_eq!(slow_consumer_verdict(1000, 0, 0, false, Rules::All, &cfg), Verdict::Keep, "at the limit");
        for (waits, rules) in [(false, Rules::All), (true, Rules::All), (false, Rules::BacklogOnly)] {
            assert_eq!(
                slow_consumer_verdict(1001, 0, 0, waits, rules, &cfg),
                Verdict::Evict(EvictReason::Backlog)
            );
        }
    }

    #[test]
    fn no_progress_for_the_write_timeout_is_evicted_only_while_a_write_waits() {
        let cfg = cfg();
        assert_eq!(slow_consumer_verdict(10, 100, 599, true, Rules::All, &cfg), Verdict::Keep, "499 ms");
        assert_eq!(
            slow_consumer_verdict(10, 100, 600, true, Rules::All, &cfg),
            Verdict::Evict(EvictReason::WriteTimeout)
        );
        assert_eq!(
            slow_consumer_verdict(10, 100, 600, false, Rules::All, &cfg),
            Verdict::Keep,
            "no write waiting on the socket"
        );
        assert_eq!(
            slow_consumer_verdict(10, 100, 600, true, Rules::BacklogOnly, &cfg),
            Verdict::Keep,
            "the batch-time sweep leaves timeouts to the timer"
        );
    }

    #[test]
    fn a_clock_behind_the_last_progress_is_not_a_timeout() {
        let cfg = cfg();
        assert_eq!(slow_consumer_verdict(0, 10_000, 0, true, Rules::All, &cfg), Verdict::Keep);
    }

    #[test]
    fn the_backlog_reason_wins_over_the_timeout() {
        let cfg = cfg();
        assert_eq!(
            slow_consumer_verdict(5000, 0, 10_000, true, Rules::All, &cfg),
            Verdict::Evict(EvictReason::Backlog)
        );
    }
}
