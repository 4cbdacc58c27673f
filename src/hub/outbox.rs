//! One connection's write plan: where it stands in the log, the private lines queued between
//! log lines, and the gathered write in flight.
//!
//! ```text
//!   Idle ──wake──► Dirty ──take_dirty──► Pending ──gather──► InFlight
//!    ▲              ▲ ▲                                         │
//!    │              │ └───────────── more to write ─────────────┤ on_written
//!    │              └── on_writable ── Blocked ◄── short write ─┤
//!    └──────────────────────────── nothing left ────────────────┘
//! ```
//!
//! A gather that finds only unwanted lines goes back to `Dirty` (more log to look at) or to
//! `Idle` (it reached the head). Once the connection's `Close` is out, a wake or `on_writable`
//! leaves the outbox `Pending` instead of `Dirty`, and a gather finds nothing.
//!
//! The outbox pins the log at its cursor while it has output and follows the log
//! ([`Outbox::pins`]); the hub passes the log in and keeps the dirty list, the outputs and the
//! counters.
use std::collections::VecDeque;
use std::io::IoSlice;
use std::sync::Arc;

use bytes::Bytes;
use smallvec::SmallVec;

use super::conn::Subscriptions;
use super::flight::{Flight, Piece, Private};
use super::log::{Log, Seq, PUBSUB};
use super::stats::WORDS;
use super::HubConfig;
use crate::proto::CommandWord;

/// Where a connection's output stands. Every state but `Idle` has output pending.
// The flight stays inline: the outbox lives in a boxed `Conn`, and boxing the flight would cost
// an allocation per write.
#[allow(clippy::large_enum_variant)]
enum WriteState {
    /// Nothing pending: the cursor is stale (moved up on the next wake) and pins nothing.
    Idle,
    /// In the hub's dirty list, waiting for `take_dirty`.
    Dirty,
    /// Out of the dirty list: taken by the driver for a gather this turn, or held back because
    /// the connection's `Close` is out.
    Pending,
    /// A gathered write is with the driver.
    InFlight(Flight),
    /// The socket is full: waiting for `on_writable`.
    Blocked,
}

/// What the outbox sends.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Feed {
    /// The log from the cursor on, interleaved with private lines.
    Log,
    /// Only private lines: the connection is closing and wants no more log lines, so its
    /// cursor pins nothing.
    Detached,
}

/// What [`Outbox::gather`] did.
pub(super) enum Gathered {
    /// Nothing to gather: idle, or a write is already in flight.
    Nothing,
    /// A write of this many bytes is in flight; [`Outbox::flight_slices`] lists it.
    Write(usize),
    /// Only lines it does not want were left up to the head: the cursor jumped there and the
    /// outbox may go idle ([`Outbox::try_idle`]).
    AtHead,
    /// Only unwanted lines before a batch's end: the outbox is dirty again (the caller puts it
    /// back in the dirty list).
    Again,
}

/// What [`Outbox::on_written`] did.
pub(super) struct Written {
    /// Whole log lines completed by this write.
    pub lines: u64,
    /// What comes next.
    pub next: AfterWrite,
}

/// Where the outbox stands after a write.
#[derive(PartialEq, Eq)]
pub(super) enum AfterWrite {
    /// Everything was written: the outbox went idle.
    Idle,
    /// More to write: the outbox is dirty (the caller puts it in the dirty list).
    Dirty,
    /// A short write: the outbox waits for `on_writable`.
    Blocked,
}

/// One connection's write plan. See the [module docs](self).
pub(super) struct Outbox {
    /// Next log line to consider, and bytes of it already written.
    cursor: Seq,
    offset: usize,
    state: WriteState,
    feed: Feed,
    private: VecDeque<Private>,
    /// Unwritten bytes of private lines: those queued plus those in the write in flight. They
    /// count against `max_pending_bytes` like the log the cursor holds back (invariant 4).
    private_bytes: u64,
    /// The part of `private_bytes` that is a 1.10–1.12 worker's catch-up (private RDATA,
    /// queued or in flight): bounded by the history, not by the queued-commands rule.
    catch_up_bytes: u64,
    /// When the connection last made write progress, or started waiting with output pending.
    progress_ms: u64,
    /// Outbound commands written, by command word (RDATA counted per line).
    outbound: [u64; WORDS],
    /// When the outbox last left `Idle` (monotonic ms): while it has output pending, how long
    /// the connection has been behind. Set once per wake from idle, never per line.
    busy_since_ms: u64,
    /// The socket's send queue held more than `writes::CONGESTED_SEND_QUEUE` after the last
    /// write the driver measured: its peer does not take what it is sent as fast as it comes.
    congested: bool,
}

impl Outbox {
    /// An idle outbox at log line `head`.
    pub(super) fn new(head: Seq, now_ms: u64) -> Self {
        Self {
            cursor: head,
            offset: 0,
            state: WriteState::Idle,
            feed: Feed::Log,
            private: VecDeque::new(),
            private_bytes: 0,
            catch_up_bytes: 0,
            progress_ms: now_ms,
            outbound: [0; WORDS],
            busy_since_ms: now_ms,
            congested: false,
        }
    }

    /// Whether the socket's send queue was found holding back its peer (see
    /// [`Outbox::set_congested`]).
    pub(super) fn congested(&self) -> bool {
        self.congested
    }

    /// Records what the driver found in the socket's send queue after a write.
    pub(super) fn set_congested(&mut self, congested: bool) {
        self.congested = congested;
    }

    /// Whether the cursor holds a pin in the log.
    #[inline]
    pub(super) fn pins(&self) -> bool {
        !matches!(self.state, WriteState::Idle) && self.feed == Feed::Log
    }

    /// Bytes this outbox holds for its connection: the log it holds back from its cursor on
    /// (while it pins it) plus its unwritten private lines. This is the backlog the
    /// `max_pending_bytes` rule measures.
    pub(super) fn backlog_bytes(&self, log: &Log) -> u64 {
        let behind = if self.pins() { log.head_byte() - log.byte_of(self.cursor) } else { 0 };
        behind + self.private_bytes
    }

    /// Unwritten bytes of private lines (queued or in flight).
    pub(super) fn private_bytes(&self) -> u64 {
        self.private_bytes
    }

    /// [`Outbox::private_bytes`] counted from scratch, to check the running count in tests.
    #[cfg(test)]
    pub(super) fn private_bytes_recounted(&self) -> u64 {
        let queued: u64 = self.private.iter().map(|p| p.bytes.len() as u64).sum();
        let in_flight: u64 = match &self.state {
            WriteState::InFlight(f) => f
                .pieces
                .iter()
                .map(|p| match p {
                    Piece::Private { line, .. } => line.bytes.len() as u64,
                    Piece::Log { .. } => 0,
                })
                .sum(),
            _ => 0,
        };
        queued + in_flight
    }

    /// Bytes of log held back from the cursor on, whether or not the outbox pins it, for
    /// tests that measure what a connection holds independently of [`Outbox::backlog_bytes`].
    #[cfg(test)]
    pub(super) fn log_behind(&self, log: &Log) -> u64 {
        if self.is_detached() || matches!(self.state, WriteState::Idle) {
            0
        } else {
            log.head_byte() - log.byte_of(self.cursor)
        }
    }

    /// Unwritten bytes of catch-up RDATA among [`Outbox::private_bytes`].
    pub(super) fn catch_up_bytes(&self) -> u64 {
        self.catch_up_bytes
    }

    /// Private lines not yet completely written (queued or in flight): the "commands queued"
    /// of PROTOCOL.md §3.3 as replhub counts them.
    pub(super) fn private_lines(&self) -> usize {
        let in_flight = match &self.state {
            WriteState::InFlight(f) => f.private_lines,
            _ => 0,
        };
        self.private.len() + in_flight
    }

    /// Lines waiting: log lines behind the cursor plus private lines.
    pub(super) fn pending_lines(&self, log: &Log) -> u64 {
        let behind = if self.pins() { log.head().0 - self.cursor.0 } else { 0 };
        behind + self.private.len() as u64
    }

    /// Whether the outbox stopped following the log (see [`Outbox::detach`]).
    pub(super) fn is_detached(&self) -> bool {
        self.feed == Feed::Detached
    }

    /// Whether a write waits on the socket (in flight, or blocked): what the write timeout
    /// measures.
    pub(super) fn waits_on_socket(&self) -> bool {
        matches!(self.state, WriteState::InFlight(_) | WriteState::Blocked)
    }

    /// When the connection last made write progress.
    pub(super) fn progress_ms(&self) -> u64 {
        self.progress_ms
    }

    /// Outbound commands written, by command word.
    pub(super) fn outbound(&self) -> &[u64; WORDS] {
        &self.outbound
    }

    /// Since when (monotonic ms) output has been pending, or `None` while idle.
    pub(super) fn busy_since_ms(&self) -> Option<u64> {
        (!matches!(self.state, WriteState::Idle)).then_some(self.busy_since_ms)
    }

    /// Queues a private line to go out before log line `at`.
    pub(super) fn push_private(&mut self, at: Seq, bytes: Bytes, word: CommandWord) {
        self.private_bytes += bytes.len() as u64;
        if word == CommandWord::Rdata {
            self.catch_up_bytes += bytes.len() as u64;
        }
        self.private.push_back(Private { at, bytes, word, partial: false });
    }

    /// Queues a private line unless an identical one is already queued, unsent, at the same
    /// place (`at`, with only private lines after it). Returns whether it was queued.
    ///
    /// Used for `POSITION`: the reference answers every `REPLICATE` with one, so a worker that
    /// repeats `REPLICATE` faster than it reads would otherwise grow the queue without limit.
    /// Dropping the repeat is invisible on the wire only under these conditions: nothing of
    /// the earlier line was written (it is still in the queue, not in flight), no log line
    /// goes out between the two (same `at`), and the bytes are identical (same stream, same
    /// token). The worker then receives one `POSITION s t` where the reference would send two
    /// identical ones back to back with nothing in between; the second would be a no-op for
    /// it (its token equals the one it just got, so no rows are fetched).
    pub(super) fn push_private_coalesced(&mut self, at: Seq, bytes: Bytes, word: CommandWord) -> bool {
        // Looking further back than the lines of one REPLICATE ALL (16 POSITION, plus a PING
        // or two) finds nothing more: identical lines beyond that were coalesced already.
        const LOOK_BACK: usize = 64;
        let same = self
            .private
            .iter()
            .rev()
            .take(LOOK_BACK)
            .take_while(|p| p.at == at && !p.partial)
            .any(|p| p.word == word && p.bytes == bytes);
        if !same {
            self.push_private(at, bytes, word);
        }
        !same
    }

    /// Output is pending from log line `from` on (or private lines). Returns whether the
    /// outbox became dirty (the caller puts it in the dirty list); `close_emitted` holds it
    /// back.
    ///
    /// Inlined: a batch wakes every subscriber, most of them already dirty.
    #[inline]
    pub(super) fn wake(&mut self, log: &mut Log, from: Seq, now_ms: u64, close_emitted: bool) -> bool {
        match self.state {
            WriteState::Idle => self.start(log, from, now_ms),
            WriteState::Pending => {}
            WriteState::Dirty | WriteState::InFlight(_) | WriteState::Blocked => return false,
        }
        self.dirty_if_pending(close_emitted)
    }

    /// Idle to `Pending` at `from`.
    fn start(&mut self, log: &mut Log, from: Seq, now_ms: u64) {
        // Idle means nothing was pending: every line before `from` is one it does not want.
        if self.cursor < from {
            self.cursor = from;
        }
        self.offset = 0;
        self.state = WriteState::Pending;
        self.progress_ms = now_ms;
        self.busy_since_ms = now_ms;
        if self.feed == Feed::Log {
            log.pin(self.cursor);
        }
    }

    /// The socket can take bytes again. Returns whether the outbox became dirty.
    #[inline]
    pub(super) fn on_writable(&mut self, close_emitted: bool) -> bool {
        if let WriteState::Blocked = self.state {
            self.state = WriteState::Pending;
        }
        self.dirty_if_pending(close_emitted)
    }

    #[inline]
    fn dirty_if_pending(&mut self, close_emitted: bool) -> bool {
        if !close_emitted && matches!(self.state, WriteState::Pending) {
            self.state = WriteState::Dirty;
            true
        } else {
            false
        }
    }

    /// Whether it is in the hub's dirty list.
    #[inline]
    pub(super) fn is_dirty(&self) -> bool {
        matches!(self.state, WriteState::Dirty)
    }

    /// Leaves the dirty list; returns whether it was in it.
    #[inline]
    pub(super) fn take_dirty(&mut self) -> bool {
        if let WriteState::Dirty = self.state {
            self.state = WriteState::Pending;
            true
        } else {
            false
        }
    }

    /// Plans the next write: at most `max_iov` pieces and about `max_write_bytes` bytes of
    /// private lines and the log lines `subs` wants, in log order.
    pub(super) fn gather(
        &mut self,
        log: &mut Log,
        subs: &Subscriptions,
        broadcast: bool,
        cfg: &HubConfig,
    ) -> Gathered {
        if matches!(self.state, WriteState::Idle | WriteState::InFlight(_)) {
            return Gathered::Nothing;
        }
        let max_iov = cfg.max_iov.max(1);
        let max_bytes = cfg.max_write_bytes.max(1);
        let head = log.head().0;
        let detached = self.feed == Feed::Detached;
        let mut pieces: SmallVec<[Piece; 4]> = SmallVec::new();
        let mut total = 0usize;
        let mut seq = self.cursor.0;
        let mut off = self.offset;
        let mut reached_head = false;
        let (mut private_bytes, mut private_lines, mut catch_up_bytes) = (0u64, 0usize, 0u64);
        let nothing_wanted = subs.wants_nothing(broadcast);
        while pieces.len() < max_iov && total < max_bytes {
            if off == 0 {
                if let Some(p) = self.private.front() {
                    if p.at.0 <= seq {
                        let line = self.private.pop_front().expect("front exists");
                        total += line.bytes.len();
                        private_bytes += line.bytes.len() as u64;
                        private_lines += 1;
                        if line.word == CommandWord::Rdata && !line.partial {
                            catch_up_bytes += line.bytes.len() as u64;
                        }
                        pieces.push(Piece::Private { line, skip: 0 });
                        continue;
                    }
                }
            }
            if seq >= head || detached {
                seq = seq.max(head);
                reached_head = true;
                break;
            }
            if nothing_wanted && off == 0 {
                // Every line up to the next private one (or the head) is skipped: no need to
                // look at them one by one. A publisher's replies are 256 pieces a write apart
                // from each other by its own messages, which its core's log holds too.
                let limit = self.private.front().map_or(head, |p| p.at.0.min(head));
                seq = seq.max(limit);
                continue;
            }
            let Some((batch, idx)) = log.locate(Seq(seq)) else {
                debug_assert!(false, "an active cursor points outside the log");
                reached_head = true;
                seq = head;
                break;
            };
            let lines = batch.lines();
            let limit = self.private.front().map_or(u64::MAX, |p| p.at.0);
            let mut i = idx;
            let mut s = seq;
            if off == 0 {
                if s >= subs.full_from && lines[i].stream != PUBSUB {
                    // Subscribed to everything: nothing to skip.
                } else {
                    while i < lines.len() && s < limit && !subs.wants(&lines[i], s, broadcast) {
                        i += 1;
                        s += 1;
                    }
                }
                if i == lines.len() || s >= limit {
                    seq = s;
                    continue;
                }
            }
            let first = i;
            let first_seq = s;
            // A batch is all Redis-mode messages or none: a subscriber to every stream takes
            // whole runs of any other batch. A run of one channel's Redis-mode messages is
            // wanted whole once its first line is (same channel, later lines), so it is taken
            // in one step too.
            if (s >= subs.full_from && lines[i].stream != PUBSUB) || (off == 0 && lines[i].stream == PUBSUB) {
                let room = usize::try_from(limit - s).unwrap_or(usize::MAX);
                let end = batch.run_end(i).min(i.saturating_add(room));
                s += (end - i) as u64;
                i = end;
            } else {
                i += 1;
                s += 1;
                while i < lines.len()
                    && s < limit
                    && lines[i].start == lines[i - 1].end
                    && subs.wants(&lines[i], s, broadcast)
                {
                    // A stream wanted at `s` is wanted at every later sequence number, so the
                    // rest of its run is taken in one step. (A channel can be unsubscribed
                    // while a line of it is half written: those go line by line.)
                    let end = if lines[i].stream_id().is_some() { batch.stream_run_end(i) } else { i + 1 };
                    let room = usize::try_from(limit - s).unwrap_or(usize::MAX);
                    let end = end.min(i.saturating_add(room));
                    s += (end - i) as u64;
                    i = end;
                }
            }
            let piece = Piece::Log { batch: Arc::clone(batch), first, end: i, skip: off, first_seq };
            total += piece.len();
            pieces.push(piece);
            off = 0;
            seq = s;
        }
        if !pieces.is_empty() && seq > self.cursor.0 && !pieces.iter().any(|p| matches!(p, Piece::Log { .. }))
        {
            // Only private lines, between log lines it does not want: the cursor moves past
            // those now, whatever the write does, so that the next gather does not look at
            // them again (a write that ends before the head would otherwise leave the cursor
            // where it was, and every write of a busy publisher would walk the same lines).
            let old = self.cursor;
            self.cursor = Seq(seq);
            self.offset = 0;
            if self.pins() {
                log.repin(old, Seq(seq));
            }
        }
        if pieces.is_empty() {
            // Only skipped lines: the cursor jumps.
            let old = self.cursor;
            self.cursor = Seq(seq);
            self.offset = 0;
            if self.pins() {
                log.repin(old, Seq(seq));
            }
            if reached_head {
                return Gathered::AtHead;
            }
            self.state = WriteState::Dirty;
            return Gathered::Again;
        }
        self.state = WriteState::InFlight(Flight {
            pieces,
            len: total,
            end: reached_head.then_some(seq),
            replanned: false,
            private_bytes,
            private_lines,
            catch_up_bytes,
        });
        Gathered::Write(total)
    }

    /// The slices of the write in flight, in order. They stay valid until
    /// [`Outbox::on_written`] (the flight holds the batches and the private lines).
    pub(super) fn flight_slices<'a>(&'a self, iov: &mut Vec<IoSlice<'a>>) {
        if let WriteState::InFlight(flight) = &self.state {
            // One push per piece: cheaper than `extend` for the one or two pieces of a write.
            for p in &flight.pieces {
                iov.push(IoSlice::new(p.bytes()));
            }
        }
    }

    /// Goes idle if nothing is left to write (no private line, no half-written line); returns
    /// whether it did.
    pub(super) fn try_idle(&mut self, log: &mut Log) -> bool {
        if matches!(self.state, WriteState::Idle) || !self.private.is_empty() || self.offset != 0 {
            return false;
        }
        let pinned = self.pins();
        self.state = WriteState::Idle;
        debug_assert_eq!(self.private_bytes, 0, "idle with private bytes counted");
        if self.private.capacity() > 8 {
            // A burst of private lines (REPLICATE ALL) is over: don't keep its queue.
            self.private = VecDeque::new();
        }
        if pinned {
            log.unpin(self.cursor);
        }
        true
    }

    /// `n` bytes of the write in flight were written (`n` may be short or zero): the cursor
    /// moves over what was written, the rest of a half-written private line is requeued.
    /// `None` if no write was in flight.
    pub(super) fn on_written(&mut self, log: &mut Log, n: usize, now_ms: u64) -> Option<Written> {
        let WriteState::InFlight(flight) = &mut self.state else {
            return None;
        };
        let requested = flight.len;
        if n > 0 {
            self.progress_ms = now_ms;
        }
        // The flight's private lines leave the count; what is requeued comes back.
        self.private_bytes -= flight.private_bytes;
        self.catch_up_bytes -= flight.catch_up_bytes;
        let settled = flight.settle(n, self.cursor, &mut self.outbound, &mut self.private);
        self.private_bytes += settled.requeued_bytes;
        self.catch_up_bytes += settled.requeued_catch_up;
        // The flight is empty now: dropping it frees nothing.
        self.state = WriteState::Pending;
        self.outbound[CommandWord::Rdata as usize] += settled.lines;
        let old = self.cursor;
        if self.feed == Feed::Log {
            if let Some((seq, off)) = settled.cursor {
                self.cursor = Seq(seq);
                self.offset = off;
            }
        }
        if old != self.cursor && self.pins() {
            log.repin(old, self.cursor);
        }
        let nothing_left = self.private.is_empty() && self.offset == 0 && self.cursor.0 >= log.head().0;
        let next = if nothing_left && self.try_idle(log) {
            AfterWrite::Idle
        } else if n < requested {
            self.state = WriteState::Blocked;
            AfterWrite::Blocked
        } else {
            self.state = WriteState::Dirty;
            AfterWrite::Dirty
        };
        Some(Written { lines: settled.lines, next })
    }

    /// Closing: stop following the log. Keeps the rest of a half-written line (so the stream
    /// stays well-formed), drops the rest of the backlog and releases the pin, so a peer that
    /// stopped reading cannot hold the log.
    pub(super) fn detach(&mut self, log: &mut Log) {
        if self.feed == Feed::Detached {
            return;
        }
        let head = log.head();
        let mut keep: Option<Private> = None;
        if let WriteState::InFlight(flight) = &mut self.state {
            // The write in flight accounts for itself and requeues any half-written line.
            flight.replanned = true;
        } else if self.offset > 0 {
            if let Some((batch, i)) = log.locate(self.cursor) {
                let meta = batch.lines()[i];
                let rest = batch.data().slice(meta.start as usize + self.offset..meta.end as usize);
                keep = Some(Private { at: head, bytes: rest, word: CommandWord::Rdata, partial: true });
            }
        }
        if keep.is_none() && self.private.front().is_some_and(|p| p.partial) {
            keep = self.private.pop_front();
        }
        // A new queue, not `clear`: the old one may have grown large (a burst of lines to a
        // peer that does not read), and its capacity would otherwise stay with the connection.
        self.private = VecDeque::new();
        (self.private_bytes, self.catch_up_bytes) = match &self.state {
            WriteState::InFlight(flight) => (flight.private_bytes, flight.catch_up_bytes),
            _ => (0, 0),
        };
        if let Some(mut k) = keep {
            k.at = head;
            self.private_bytes += k.bytes.len() as u64;
            self.private.push_back(k);
        }
        let (old, pinned) = (self.cursor, self.pins());
        self.cursor = head;
        self.offset = 0;
        self.feed = Feed::Detached;
        if pinned {
            log.unpin(old);
        }
    }

    /// The connection is gone: releases its pin.
    pub(super) fn release(&mut self, log: &mut Log) {
        if self.pins() {
            log.unpin(self.cursor);
        }
        self.state = WriteState::Idle;
    }
}
