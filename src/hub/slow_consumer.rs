//! The slow-consumer rule (ARCHITECTURE.md invariant 4), as a pure function of what the hub
//! knows about one connection, so that [`Hub::sweep`](super::Hub) only gathers the inputs.
//!
//! The rule judges the worker, not the hub: a backlog the hub built up itself (it was busy
//! elsewhere, e.g. filling the send buffers of a crowd of stalled workers) says nothing about a
//! worker whose socket keeps taking bytes. So the backlog limit condemns only a connection that
//! is not draining: a write waits on its socket and the socket has taken nothing for
//! [`drain_window_ms`]. A draining connection may hold up to twice the limit
//! ([`hard_limit`]), never more, which keeps the memory bound of invariant 4.
use super::stats::EvictReason;
use super::HubConfig;

/// How long a socket may take no bytes, while a write waits on it, and still count as
/// draining (capped by the write timeout). Long enough that a core which lagged for a moment
/// does not mistake a healthy worker for a stalled one; short next to the time a stalled
/// worker takes to build a backlog of twice the limit at any rate worth evicting for.
pub(super) const DRAIN_WINDOW_MS: u64 = 1_000;

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

/// What the hub knows about one connection's output when it judges it.
#[derive(Clone, Copy, Debug)]
pub(super) struct Progress {
    /// Bytes of log it holds back.
    pub backlog_bytes: u64,
    /// When it last made write progress (or started waiting with output pending).
    pub progress_ms: u64,
    /// Whether a write waits on its socket (in flight, or blocked after a short write).
    pub waits_on_socket: bool,
}

/// The backlog no connection may exceed, draining or not: twice `max_pending_bytes`.
pub(super) fn hard_limit(cfg: &HubConfig) -> u64 {
    cfg.max_pending_bytes.saturating_mul(2)
}

/// How long a socket that takes nothing still counts as draining: [`DRAIN_WINDOW_MS`], or the
/// write timeout if that is shorter.
pub(super) fn drain_window_ms(cfg: &HubConfig) -> u64 {
    DRAIN_WINDOW_MS.min(cfg.write_timeout_ms)
}

/// The verdict on a connection at `now_ms`.
///
/// In order:
/// 1. a backlog over [`hard_limit`] is evicted (`Backlog`) whatever the socket does;
/// 2. a backlog over `max_pending_bytes` is evicted (`Backlog`) unless the connection is
///    draining: no write waits on its socket (its last write was taken whole, so the backlog
///    is the hub's own lag), or its socket took bytes within [`drain_window_ms`];
/// 3. with [`Rules::All`], a write that waits on the socket with no progress for
///    `write_timeout_ms` is evicted (`WriteTimeout`). A connection with no write waiting
///    (nothing to send, or not yet gathered) is never evicted for time.
pub(super) fn slow_consumer_verdict(p: Progress, now_ms: u64, rules: Rules, cfg: &HubConfig) -> Verdict {
    let idle_for = now_ms.saturating_sub(p.progress_ms);
    let draining = !p.waits_on_socket || idle_for < drain_window_ms(cfg);
    if p.backlog_bytes > hard_limit(cfg) || (p.backlog_bytes > cfg.max_pending_bytes && !draining) {
        Verdict::Evict(EvictReason::Backlog)
    } else if rules == Rules::All && p.waits_on_socket && idle_for >= cfg.write_timeout_ms {
        Verdict::Evict(EvictReason::WriteTimeout)
    } else {
        Verdict::Keep
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> HubConfig {
        HubConfig { max_pending_bytes: 1000, write_timeout_ms: 5_000, ..HubConfig::default() }
    }

    /// A connection blocked on its socket since `progress_ms`.
    fn blocked(backlog_bytes: u64, progress_ms: u64) -> Progress {
        Progress { backlog_bytes, progress_ms, waits_on_socket: true }
    }

    /// A connection with no write waiting on its socket, last progress at `progress_ms`.
    fn not_waiting(backlog_bytes: u64, progress_ms: u64) -> Progress {
        Progress { backlog_bytes, progress_ms, waits_on_socket: false }
    }

    fn verdict(p: Progress, now_ms: u64) -> Verdict {
        slow_consumer_verdict(p, now_ms, Rules::All, &cfg())
    }

    #[test]
    fn a_stalled_socket_over_the_limit_is_evicted_once_the_drain_window_passed() {
        for rules in [Rules::All, Rules::BacklogOnly] {
            let v = |p, now| slow_consumer_verdict(p, now, rules, &cfg());
            assert_eq!(v(blocked(1000, 0), 4_000), Verdict::Keep, "at the limit");
            assert_eq!(v(blocked(1001, 0), 999), Verdict::Keep, "took bytes 999 ms ago");
            assert_eq!(v(blocked(1001, 0), 1000), Verdict::Evict(EvictReason::Backlog));
        }
    }

    #[test]
    fn a_draining_connection_is_not_evicted_for_the_hubs_own_lag() {
        // The hub lagged: the backlog is over the limit, but the socket took the last write
        // whole (no write waits on it), however long ago that was.
        assert_eq!(verdict(not_waiting(2000, 0), 60_000), Verdict::Keep);
        // A short write just now: the socket is full but drains.
        assert_eq!(verdict(blocked(2000, 9_500), 10_000), Verdict::Keep);
    }

    #[test]
    fn nobody_exceeds_twice_the_limit() {
        assert_eq!(verdict(not_waiting(2000, 0), 0), Verdict::Keep, "at the hard limit");
        assert_eq!(verdict(not_waiting(2001, 0), 0), Verdict::Evict(EvictReason::Backlog));
        assert_eq!(verdict(blocked(2001, 10), 10), Verdict::Evict(EvictReason::Backlog));
        let max = HubConfig { max_pending_bytes: u64::MAX, ..cfg() };
        assert_eq!(
            slow_consumer_verdict(not_waiting(u64::MAX, 0), 0, Rules::All, &max),
            Verdict::Keep,
            "the hard limit saturates"
        );
    }

    #[test]
    fn the_drain_window_is_never_longer_than_the_write_timeout() {
        let short = HubConfig { write_timeout_ms: 300, ..cfg() };
        assert_eq!(drain_window_ms(&short), 300);
        assert_eq!(drain_window_ms(&cfg()), DRAIN_WINDOW_MS);
        assert_eq!(
            slow_consumer_verdict(blocked(1001, 0), 300, Rules::BacklogOnly, &short),
            Verdict::Evict(EvictReason::Backlog)
        );
    }

    #[test]
    fn no_progress_for_the_write_timeout_is_evicted_only_while_a_write_waits() {
        let cfg = cfg();
        assert_eq!(verdict(blocked(10, 100), 5_099), Verdict::Keep, "4999 ms");
        assert_eq!(verdict(blocked(10, 100), 5_100), Verdict::Evict(EvictReason::WriteTimeout));
        assert_eq!(verdict(not_waiting(10, 100), 5_100), Verdict::Keep, "no write waiting on the socket");
        assert_eq!(
            slow_consumer_verdict(blocked(10, 100), 5_100, Rules::BacklogOnly, &cfg),
            Verdict::Keep,
            "the batch-time sweep leaves timeouts to the timer"
        );
    }

    #[test]
    fn a_clock_behind_the_last_progress_is_not_a_timeout() {
        assert_eq!(verdict(blocked(1500, 10_000), 0), Verdict::Keep);
    }

    #[test]
    fn the_backlog_reason_wins_over_the_timeout() {
        assert_eq!(verdict(blocked(5000, 0), 10_000), Verdict::Evict(EvictReason::Backlog));
    }
}
