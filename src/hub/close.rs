//! Closing connections: ERROR-and-close, detaching a closing connection from the log, the
//! peer going away, and shutdown.
use super::stats::CloseReason;
use super::{ConnId, Hub, HubOutput, UpstreamCmd};
use crate::proto::{PeerError, SyncState};
use crate::time::Now;

impl Hub {
    /// Sends `ERROR <err>` and closes once it is written.
    pub(super) fn fail(&mut self, id: ConnId, err: &PeerError, reason: CloseReason, now: Now) {
        let Some(c) = self.conns.get_mut(id) else { return };
        if c.close.is_closing() {
            return;
        }
        if c.resp.is_some() {
            // Redis says nothing before closing a client (an eviction, a shutdown).
            if reason == CloseReason::SlowConsumer {
                c.outbox.detach(&mut self.log);
            }
            self.close_resp(id, reason, now);
            return;
        }
        c.close.decide(reason);
        c.session.fail(err, now);
        self.drain_session(id, now);
    }

    /// A closing connection wants no more log lines: its outbox drops the backlog and releases
    /// its pin (see [`Outbox::detach`](super::outbox::Outbox::detach)).
    pub(super) fn detach(&mut self, id: ConnId) {
        let Some(c) = self.conns.get_mut(id) else { return };
        c.outbox.detach(&mut self.log);
    }

    /// The socket is gone (EOF, error, or after our `Close`): forget the connection.
    pub fn on_peer_closed(&mut self, id: ConnId, lost: bool, now: Now) {
        self.resp_gone(id);
        let Some(mut c) = self.conns.remove(id) else { return };
        let reason = c.close.reason().unwrap_or(if lost {
            CloseReason::ConnectionLost
        } else {
            CloseReason::ConnectionDone
        });
        self.stats.close_reasons[reason as usize] += 1;
        tracing::info!(
            conn = %id,
            name = c.display_name(),
            reason = reason.label(),
            "connection closed"
        );
        self.forget_subscriptions(id, c.subs.mask, c.subs.pending);
        c.outbox.release(&mut self.log);
        for user_id in self.user_sync.remove_reporter(id) {
            self.outputs.push_back(HubOutput::Upstream(UpstreamCmd::UserSync {
                user_id,
                state: SyncState::End,
                last_sync_ms: now.wall_ms,
            }));
        }
    }

    /// Shutting down: `ERROR server shutting down` to every worker; each is closed once it is
    /// written. New connections get the same.
    pub fn shutdown(&mut self, now: Now) {
        self.shutting_down = true;
        let ids: Vec<ConnId> = self.conns.ids().collect();
        for id in ids {
            self.fail(id, &PeerError::ShuttingDown, CloseReason::ConnectionDone, now);
        }
    }
}
