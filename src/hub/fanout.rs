//! Fan-out: appending an upstream batch to the log and waking the connections that want its
//! lines.
use std::sync::Arc;

use smallvec::SmallVec;

use super::log::{Batch, Seq, BROADCAST};
use super::slow_consumer::Rules;
use super::stats::ConnPhase;
use super::{ConnId, Hub, MAX_QUEUED_BYTES};
use crate::proto::{Generation, StreamMask};
use crate::time::Now;

impl Hub {
    /// Appends a batch shared by all cores to this core's log and wakes its subscribers.
    pub fn on_batch(&mut self, batch: Arc<Batch>, now: Now) {
        let first = self.log.append(Arc::clone(&batch));
        // Only a 1.10–1.12 master's workers are caught up from a token: no other generation
        // pays for the history.
        if self.generation == Some(Generation::V1_10) {
            self.history.append(&batch);
        }
        self.stats.batches += 1;
        let mut streams = 0u32;
        let mut broadcast = false;
        let mut channels: SmallVec<[u32; 4]> = SmallVec::new();
        for (i, meta) in batch.lines().iter().enumerate() {
            if meta.stream == BROADCAST {
                broadcast = true;
                continue;
            }
            if let Some(ch) = meta.channel() {
                if !channels.contains(&ch) {
                    channels.push(ch);
                }
                continue;
            }
            let Some(s) = meta.stream_id() else { continue };
            streams |= s.bit();
            match meta.token {
                None => self.open_run[s.index()] = true,
                Some(token) => {
                    self.open_run[s.index()] = false;
                    self.tokens[s.index()] = Some(token);
                    if !self.pending_subs[s.index()].is_empty() && self.served.is_some() {
                        let at = Seq(first.0 + i as u64 + 1);
                        for id in std::mem::take(&mut self.pending_subs[s.index()]) {
                            if let Some(c) = self.conn_mut(id) {
                                c.subs.pending.remove(s);
                            }
                            self.subscribe_from(id, s, at, first, token, now);
                        }
                    }
                }
            }
        }
        // The hot loop of a batch: borrow the fields apart so that each wake is one slot
        // lookup and an inlined state check, and a connection parked on its socket not even
        // that.
        let Self { stream_subs, conns, log, dirty, parked, .. } = self;
        for s in StreamMask(streams).iter() {
            for &id in &stream_subs[s.index()] {
                let slot = id.index as usize;
                if parked.get(slot).is_some_and(|&p| p == id.gen.wrapping_add(1)) {
                    continue;
                }
                let Some(c) = conns.get_mut(id) else { continue };
                if c.outbox.wake(log, first, now.mono_ms, c.close.emitted()) {
                    dirty.push(id, c);
                } else if c.outbox.waits_on_socket() {
                    if parked.len() <= slot {
                        parked.resize(slot + 1, 0);
                    }
                    parked[slot] = id.gen.wrapping_add(1);
                }
            }
        }
        for ch in channels {
            self.resp_wake_channel(ch, first, now);
        }
        if broadcast {
            // RESP connections never take BROADCAST lines (`Conn::wants_broadcast`).
            for (id, c) in self.conns.iter_mut() {
                if c.phase != ConnPhase::Waiting
                    && c.resp.is_none()
                    && c.outbox.wake(&mut self.log, first, now.mono_ms, c.close.emitted())
                {
                    self.dirty.push(id, c);
                }
            }
        }
        // Nobody parked in (or before) this batch: drop it now.
        self.log.trim();
        self.stats.log_bytes = self.log.held_bytes();
        // A backlog is the log behind a cursor plus at most `MAX_QUEUED_BYTES` of private lines.
        let mut sweep_at = self.config.max_pending_bytes.saturating_sub(MAX_QUEUED_BYTES);
        if let Some(hard) = self.resp_hard_limit() {
            sweep_at = sweep_at.min(hard);
        }
        if self.log.held_bytes() > sweep_at {
            self.sweep(now, Rules::BacklogOnly);
        }
    }

    /// Marks a connection as having output from log line `from` on (or private lines).
    pub(super) fn wake(&mut self, id: ConnId, from: Seq, now: Now) {
        let Some(c) = self.conns.get_mut(id) else { return };
        if c.outbox.wake(&mut self.log, from, now.mono_ms, c.close.emitted()) {
            self.dirty.push(id, c);
        }
    }
}
