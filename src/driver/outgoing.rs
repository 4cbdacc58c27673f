//! Messages for cores' mailboxes, handed out without ever waiting for a core: what does not
//! fit in a core's mailbox waits here, in that core's queue, in order, and moves on as the core
//! takes its mail ([`Outgoing::flush`]; a mailbox has no "taken" signal, so the owner retries
//! on every turn and on a short timer while anything waits).
//!
//! Two owners: the source thread (the master's batches, the Redis bridge's messages), which
//! applies its back-pressure rule on top ([`Outgoing::over_limit`], module doc of `source`);
//! and every core, for its Redis-mode publishes to the other cores
//! ([`Outgoing::hand_out_published`]), which are never held back: past the limit they are
//! dropped for that core alone and a [`CoreMsg::PublishLost`] takes their place.

use std::collections::VecDeque;
use std::sync::mpsc::TrySendError;
use std::sync::Arc;

use super::{CoreMsg, Inbox};
use crate::hub::{Batch, LineMeta};

/// What waits for one core.
#[derive(Default)]
struct CoreQueue {
    msgs: VecDeque<CoreMsg>,
    /// Batch bytes in `msgs`.
    bytes: usize,
    /// The core's mailbox is gone (the core stopped): nothing more is queued for it.
    gone: bool,
    /// Redis-mode batches dropped for this core because this queue was at its bound.
    dropped: u64,
}

impl CoreQueue {
    /// Puts `msg` straight into the core's mailbox when nothing waits before it and there is
    /// room; gives it back when it has to wait here (the caller queues or drops it), and
    /// forgets it for a core that is gone.
    fn offer(&mut self, core: &Inbox<CoreMsg>, msg: CoreMsg) -> Option<CoreMsg> {
        if self.gone {
            return None;
        }
        if !self.msgs.is_empty() {
            return Some(msg);
        }
        match send(core, msg) {
            Ok(()) => None,
            Err(TrySendError::Full(m)) => Some(m),
            Err(TrySendError::Disconnected(_)) => {
                self.gone = true;
                None
            }
        }
    }
}

/// Sends without blocking. Batches and the upstream's news only bring the core's state up to
/// date, so a core with no connection is not woken for each ([`Inbox::try_send_update`]).
// The error gives a refused message back, as `Inbox::try_send` does (`CoreMsg` is large for
// the rare `Upstream`; see its note).
#[allow(clippy::result_large_err)]
fn send(core: &Inbox<CoreMsg>, msg: CoreMsg) -> Result<(), TrySendError<CoreMsg>> {
    match msg {
        CoreMsg::Batch(_) | CoreMsg::Upstream(_) => core.try_send_update(msg),
        _ => core.try_send(msg),
    }
}

fn msg_bytes(msg: &CoreMsg) -> usize {
    match msg {
        CoreMsg::Batch(b) => b.data().len(),
        CoreMsg::PublishLost { channels, .. } => channels.len() * std::mem::size_of::<u32>(),
        _ => 0,
    }
}

/// One queue per core of the mailboxes an owner sends to (the same slice, in the same order,
/// passed to every call).
pub(crate) struct Outgoing {
    queues: Vec<CoreQueue>,
    /// Bytes a queue holds before Redis-mode batches are dropped for its core (the hub's
    /// `max_pending_bytes`); the source also stops reading past it.
    limit: usize,
}

impl Outgoing {
    /// Empty queues for `cores` mailboxes.
    pub(crate) fn new(cores: usize, limit: usize) -> Self {
        Self { queues: (0..cores).map(|_| CoreQueue::default()).collect(), limit }
    }

    /// Moves queued messages into the mailboxes while they have room.
    pub(crate) fn flush(&mut self, cores: &[Inbox<CoreMsg>]) {
        for (core, q) in cores.iter().zip(&mut self.queues) {
            while let Some(msg) = q.msgs.pop_front() {
                let n = msg_bytes(&msg);
                match send(core, msg) {
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

    /// Whether anything waits here for a core (then the owner retries on a timer).
    pub(crate) fn queued(&self) -> bool {
        self.queues.iter().any(|q| !q.msgs.is_empty())
    }

    /// Whether some core's queue holds more than the limit.
    pub(crate) fn over_limit(&self) -> bool {
        self.queues.iter().any(|q| q.bytes > self.limit)
    }

    /// One message to every core, in core order, never waiting and never dropping: queued here
    /// for a core whose mailbox is full (or that has messages queued already).
    pub(crate) fn hand_out(&mut self, cores: &[Inbox<CoreMsg>], make: impl Fn() -> CoreMsg) {
        self.flush(cores);
        for (core, q) in cores.iter().zip(&mut self.queues) {
            if let Some(msg) = q.offer(core, make()) {
                q.bytes += msg_bytes(&msg);
                q.msgs.push_back(msg);
            }
        }
    }

    /// A batch of Redis-mode messages to every core, without waiting: queued here for a core
    /// whose mailbox is full, as long as that core's queue stays within the limit; past it,
    /// dropped for that core alone and recorded in a [`CoreMsg::PublishLost`] at the end of its
    /// queue (one for a run of dropped batches), so that the core cuts off the subscribers
    /// that miss messages (module doc of `source`, "Back-pressure").
    pub(crate) fn hand_out_published(&mut self, cores: &[Inbox<CoreMsg>], batch: &Arc<Batch>) {
        self.flush(cores);
        let n = batch.data().len();
        for (index, (core, q)) in cores.iter().zip(&mut self.queues).enumerate() {
            let Some(msg) = q.offer(core, CoreMsg::Batch(Arc::clone(batch))) else { continue };
            if q.bytes + n <= self.limit {
                q.bytes += n;
                q.msgs.push_back(msg);
                continue;
            }
            if q.dropped == 0 || q.dropped.is_power_of_two() {
                tracing::warn!(
                    queue = index,
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

    /// Messages waiting per core (tests).
    #[cfg(test)]
    pub(crate) fn messages(&self) -> Vec<usize> {
        self.queues.iter().map(|q| q.msgs.len()).collect()
    }

    /// Batch bytes waiting per core (tests).
    #[cfg(test)]
    pub(crate) fn bytes(&self) -> Vec<usize> {
        self.queues.iter().map(|q| q.bytes).collect()
    }

    /// Redis-mode batches dropped per core (tests).
    #[cfg(test)]
    pub(crate) fn dropped(&self) -> Vec<u64> {
        self.queues.iter().map(|q| q.dropped).collect()
    }
}
