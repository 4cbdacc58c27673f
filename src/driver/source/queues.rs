//! What waits in the source for each core, and the back-pressure rule (module doc of `source`).

use std::collections::VecDeque;
use std::sync::mpsc::TrySendError;

#[cfg(test)]
use super::QueueReport;
use super::{Source, Upstream, HOLD_RETRY};
use crate::driver::CoreMsg;

/// What waits in the source for one core.
#[derive(Default)]
pub(super) struct CoreQueue {
    msgs: VecDeque<CoreMsg>,
    /// Batch bytes in `msgs`.
    bytes: usize,
    /// The core's mailbox is gone (the core stopped): nothing more is queued for it.
    gone: bool,
}

fn msg_bytes(msg: &CoreMsg) -> usize {
    match msg {
        CoreMsg::Batch(b) => b.data().len(),
        _ => 0,
    }
}

impl Source {
    #[cfg(test)]
    pub(super) fn queue_report(&self) -> QueueReport {
        QueueReport {
            messages: self.queues.iter().map(|q| q.msgs.len()).collect(),
            bytes: self.queues.iter().map(|q| q.bytes).collect(),
            blocked: self.blocked,
            batches: self.batches,
        }
    }

    /// Moves queued messages into the cores' mailboxes while they have room.
    pub(super) fn flush(&mut self) {
        for (core, q) in self.ctx.cores.iter().zip(&mut self.queues) {
            while let Some(msg) = q.msgs.pop_front() {
                let n = msg_bytes(&msg);
                match core.try_send(msg) {
                    Ok(()) => q.bytes -= n,
                    Err(TrySendError::Full(m)) => {
                        q.msgs.push_front(m);
                        break;
                    }
                    // That core is gone (it failed, or the server is stopping): forget it.
                    Err(TrySendError::Disconnected(_)) => {
                        q.gone = true;
                        q.msgs.clear();
                        q.bytes = 0;
                    }
                }
            }
        }
    }

    /// Whether a core is busy: after moving what fits into the mailboxes, some core still has a
    /// message queued here (its mailbox is full). Read data is held meanwhile (module doc).
    pub(super) fn busy(&mut self) -> bool {
        self.flush();
        self.queued()
    }

    /// Whether anything waits here for a core (then the source retries on a timer).
    pub(super) fn queued(&self) -> bool {
        self.queues.iter().any(|q| !q.msgs.is_empty())
    }

    /// Sends one message to every core, in core order. A core whose mailbox is full gets it
    /// queued here; the others get it at once. Then, while some core's queue is over the limit,
    /// waits for that core (the one rule that slows the source). False if the source must stop.
    pub(super) async fn broadcast(&mut self, up: &mut dyn Upstream, make: impl Fn() -> CoreMsg) -> bool {
        self.hand_out(make);
        while self.queues.iter().any(|q| q.bytes > self.limit) {
            self.blocked = true;
            // No signal says a core took from its mailbox: retry on a short timer, and keep
            // taking commands and control requests (a stop, a scrape) meanwhile.
            tokio::select! {
                () = self.ctx.wakeup.notified() => {}
                () = tokio::time::sleep(HOLD_RETRY) => {}
            }
            self.drain(up);
            if self.stopping() {
                return false;
            }
            self.flush();
        }
        self.blocked = false;
        true
    }

    /// The first half of [`Source::broadcast`], which never waits: one message to every core,
    /// queued here for a core whose mailbox is full. Redis-mode batches take only this half: a
    /// core's PUBLISH is never held back, and what waits here for a stalled core counts toward
    /// the limit that slows the upstream reads.
    pub(super) fn hand_out(&mut self, make: impl Fn() -> CoreMsg) {
        self.flush();
        for (core, q) in self.ctx.cores.iter().zip(&mut self.queues) {
            if q.gone {
                continue;
            }
            let msg = make();
            if !q.msgs.is_empty() {
                q.bytes += msg_bytes(&msg);
                q.msgs.push_back(msg);
                continue;
            }
            match core.try_send(msg) {
                Ok(()) => {}
                Err(TrySendError::Full(m)) => {
                    q.bytes += msg_bytes(&m);
                    q.msgs.push_back(m);
                }
                Err(TrySendError::Disconnected(_)) => q.gone = true,
            }
        }
    }
}
