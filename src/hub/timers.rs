//! Timers: session ticks (PING, ping timeout, close linger) and the slow-consumer sweep.
use super::conn::CloseState;
use super::evict_log::EvictLog;
use super::slow_consumer::{slow_consumer_verdict, Progress, Rules, Verdict};
use super::stats::{CloseReason, EvictReason};
use super::{CloseHow, ConnId, Hub, HubOutput};
use crate::proto::PeerError;
use crate::session::TimerAction;
use crate::time::Now;

/// How often [`Hub::handle_timeout`] wants to run: session ticks and the slow-consumer sweep.
pub(super) const TICK_MS: u64 = 100;

impl Hub {
    /// Timers: session ticks (PING, ping timeout, close linger) and the slow-consumer sweep.
    pub fn handle_timeout(&mut self, now: Now) {
        if now.mono_ms < self.next_tick_ms {
            return;
        }
        self.next_tick_ms = now.mono_ms + TICK_MS;
        let ids: Vec<ConnId> = self.conns.ids().collect();
        for id in ids {
            self.tick(id, now);
        }
        self.sweep(now, Rules::All);
        if let Some((count, over_ms)) = self.evict_log.due(now.mono_ms) {
            tracing::warn!(
                "{count} more slow consumers evicted in the last {} s (logged at debug level)",
                over_ms.div_ceil(1000)
            );
        }
    }

    /// One connection's session timers.
    fn tick(&mut self, id: ConnId, now: Now) {
        let Some(c) = self.conn_mut(id) else { return };
        match c.session.handle_timeout(now) {
            TimerAction::Abort => {
                // Also after a graceful close: a peer that never sends EOF is dropped.
                if !matches!(c.close, CloseState::AbortEmitted(_)) {
                    c.close =
                        CloseState::AbortEmitted(c.close.reason().unwrap_or(CloseReason::ConnectionAborted));
                    tracing::info!(conn = %id, name = c.display_name(), "close linger expired, aborting");
                    self.outputs.push_back(HubOutput::Close { conn: id, how: CloseHow::Abort });
                }
            }
            TimerAction::None => {
                if c.session.is_closing() && !c.close.is_closing() {
                    // The session failed on its own: ping timeout.
                    c.close.decide(CloseReason::PingTimeout);
                    tracing::info!(conn = %id, name = c.display_name(), "ping timeout");
                }
                if c.session.has_transmit() {
                    self.drain_session(id, now);
                }
            }
        }
    }

    /// When [`Hub::handle_timeout`] next wants to run (monotonic ms).
    pub fn poll_timeout(&self) -> u64 {
        self.next_tick_ms
    }

    /// Evicts the connections [`slow_consumer_verdict`] condemns (invariant 4). Closing
    /// connections and idle ones hold no backlog and are left alone.
    pub(super) fn sweep(&mut self, now: Now, rules: Rules) {
        let mut evict = Vec::new();
        let mut resp_evict = Vec::new();
        for (id, c) in self.conns.iter() {
            if !c.outbox.pins() || c.close.is_closing() {
                continue;
            }
            if c.resp.is_some() {
                // Redis-mode clients follow Redis's output buffer limits instead.
                resp_evict.push(id);
                continue;
            }
            let progress = Progress {
                backlog_bytes: c.outbox.backlog_bytes(&self.log),
                progress_ms: c.outbox.progress_ms(),
                waits_on_socket: c.outbox.waits_on_socket(),
            };
            let verdict = slow_consumer_verdict(progress, now.mono_ms, rules, &self.config);
            if let Verdict::Evict(reason) = verdict {
                evict.push((id, reason));
            }
        }
        for (id, reason) in evict {
            self.evict(id, reason, now);
        }
        for id in resp_evict {
            if self.resp_over_limits(id, now) {
                self.resp_evict(id, EvictReason::Backlog, now);
            }
        }
    }

    /// Drops a slow consumer's backlog, tells it `ERROR Failed to keep up` and closes it.
    pub(super) fn evict(&mut self, id: ConnId, reason: EvictReason, now: Now) {
        let backlog = self.backlog_bytes(id).unwrap_or(0);
        let Some(c) = self.conns.get(id) else { return };
        if self.evict_log.evicted(now.mono_ms) == EvictLog::Full {
            tracing::warn!(
                conn = %id,
                name = c.display_name(),
                reason = reason.label(),
                backlog,
                "slow consumer evicted"
            );
        } else {
            tracing::debug!(conn = %id, name = c.display_name(), reason = reason.label(), backlog, "slow consumer evicted");
        }
        self.stats.evictions[reason as usize] += 1;
        self.fail(id, &PeerError::FailedToKeepUp, CloseReason::SlowConsumer, now);
    }
}
