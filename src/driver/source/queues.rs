//! What waits in the source for each core (an [`Outgoing`]), and the back-pressure rule
//! (module doc of `source`).

#[cfg(test)]
use super::QueueReport;
use super::{Source, Upstream, HOLD_RETRY};
use crate::driver::CoreMsg;

impl Source {
    #[cfg(test)]
    pub(super) fn queue_report(&self) -> QueueReport {
        QueueReport {
            messages: self.queues.messages(),
            bytes: self.queues.bytes(),
            blocked: self.blocked,
            batches: self.batches,
            dropped: self.queues.dropped(),
        }
    }

    /// Moves queued messages into the cores' mailboxes while they have room.
    pub(super) fn flush(&mut self) {
        self.queues.flush(&self.ctx.cores);
    }

    /// Whether a core is busy: after moving what fits into the mailboxes, some core still has a
    /// message queued here (its mailbox is full). Read data is held meanwhile (module doc).
    pub(super) fn busy(&mut self) -> bool {
        self.flush();
        self.queued()
    }

    /// Whether anything waits here for a core (then the source retries on a timer).
    pub(super) fn queued(&self) -> bool {
        self.queues.queued()
    }

    /// Sends one message to every core, in core order. A core whose mailbox is full gets it
    /// queued here; the others get it at once. Then, while some core's queue is over the limit,
    /// waits for that core (the one rule that slows the source). False if the source must stop.
    pub(super) async fn broadcast(&mut self, up: &mut dyn Upstream, make: impl Fn() -> CoreMsg) -> bool {
        self.queues.hand_out(&self.ctx.cores, make);
        while self.queues.over_limit() {
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
}
