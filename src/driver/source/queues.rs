//! What waits in the source for each core, and the back-pressure rule (module doc of `source`).

use std::collections::VecDeque;
use std::sync::mpsc::TrySendError;
use std::sync::Arc;

#[cfg(test)]
use super::QueueReport;
use super::{Source, Upstream, HOLD_RETRY};
use crate::driver::CoreMsg;
use crate::hub::{Batch, LineMeta};

/// What waits in the source for one core.
#[derive(Default)]
pub(super) struct CoreQueue {
    msgs: VecDeque<CoreMsg>,
    /// Batch bytes in `msgs`.
    bytes: usize,
    /// The core's mailbox is gone (the core stopped): nothing more is queued for it.
    gone: bool,
    /// Redis-mode batches dropped for this core because this queue was at its bound.
    dropped: u64,
}

fn msg_bytes(msg: &CoreMsg) -> usize {
    match msg {
        CoreMsg::Batch(b) => b.data().len(),
        CoreMsg::PublishLost { channels, .. } => channels.len() * std::mem::size_of::<u32>(),
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
            dropped: self.queues.iter().map(|q| q.dropped).collect(),
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

    /// A core's batch of Redis-mode messages, to every core without waiting: queued here for a
    /// core whose mailbox is full, as long as that core's queue stays within the limit; past
    /// it, dropped for that core alone and recorded in a [`CoreMsg::PublishLost`] at the end
    /// of its queue (one for a run of dropped batches), so that the core cuts off the
    /// subscribers that miss messages (module doc, "Back-pressure").
    pub(super) fn hand_out_published(&mut self, batch: &Arc<Batch>) {
        self.flush();
        let n = batch.data().len();
        for (index, (core, q)) in self.ctx.cores.iter().zip(&mut self.queues).enumerate() {
            if q.gone {
                continue;
            }
            let mut msg = CoreMsg::Batch(Arc::clone(batch));
            if q.msgs.is_empty() {
                match core.try_send(msg) {
                    Ok(()) => continue,
                    Err(TrySendError::Full(m)) => msg = m,
                    Err(TrySendError::Disconnected(_)) => {
                        q.gone = true;
                        continue;
                    }
                }
            }
            if q.bytes + n <= self.limit {
                q.bytes += n;
                q.msgs.push_back(msg);
                continue;
            }
            if q.dropped == 0 || q.dropped.is_power_of_two() {
                tracing::warn!(
                    core = index,
                    queued = q.bytes,
                    dropped = q.dropped + 1,
                    "a core takes no Redis-mode messages: dropping them for it (its subscribers of those channels are cut off)"
                );
            }
            q.dropped += 1;
            if !matches!(q.msgs.back(), Some(CoreMsg::PublishLost { .. })) {
                q.msgs.push_back(CoreMsg::PublishLost { channels: Vec::new(), batches: 0 });
            }
            if let Some(lost @ CoreMsg::PublishLost { .. }) = q.msgs.back_mut() {
                let before = msg_bytes(lost);
                if let CoreMsg::PublishLost { channels, batches } = lost {
                    *batches += 1;
                    channels.extend(batch.lines().iter().filter_map(LineMeta::channel));
                    channels.sort_unstable();
                    channels.dedup();
                }
                // The marker's channel list counts too (it only grows), so the queue stays
                // within the limit plus one channel table.
                q.bytes += msg_bytes(lost) - before;
            }
        }
    }

    /// The first half of [`Source::broadcast`], which never waits: one message to every core,
    /// queued here for a core whose mailbox is full.
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
