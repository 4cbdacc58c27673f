//! Writes: the dirty list, and the glue between the driver's write loop and each connection's
//! [`Outbox`](super::outbox::Outbox) (which plans the writes and accounts for them).
use std::io::IoSlice;

use super::conn::CloseState;
use super::outbox::{AfterWrite, Gathered};
use super::stats::{CloseReason, ConnPhase};
use super::{CloseHow, ConnId, Hub, HubOutput};
use crate::proto::CommandWord;
use crate::time::Now;

/// Bytes a worker's socket must have taken before its writes go first in a turn: more than a
/// worker that never reads can absorb (the send buffer, 2 × 256 KiB by default, and the peer's
/// initial receive window), so only a worker that reads gets there. When a crowd of stalled
/// workers fills its send buffers, the readers are served before them each turn.
pub(super) const PROVEN_READER_BYTES: u64 = 1 << 20;

/// Bytes a socket's send queue may hold after a write before the connection counts as
/// congested: more than its peer's receive window lets through, so a worker that does not read
/// gets there after its first write or two, while a reader's queue empties as fast as it is
/// filled (over loopback at once; over a network, its bandwidth times the round trip, which
/// only costs it its place among the unproven until it is proven).
pub(crate) const CONGESTED_SEND_QUEUE: u64 = 64 << 10;

/// Which group of the turn's order a dirty connection is in (see [`Hub::take_dirty`]).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Rank {
    /// Took more than a worker that never reads could absorb.
    Proven,
    /// Not proven yet, and its send queue empties: a new reader, most likely.
    Clear,
    /// Not proven, and its send queue holds bytes back: most likely a worker that stopped
    /// reading, whose send buffer is being filled.
    Congested,
}

impl Hub {
    /// Moves the session's queued lines into the connection's outbox at the head. A session
    /// that decided to close (an ERROR, a ping timeout) detaches the connection first.
    pub(super) fn drain_session(&mut self, id: ConnId, now: Now) {
        let Some(c) = self.conns.get_mut(id) else { return };
        if c.session.is_closing() && !c.outbox.is_detached() {
            c.close.decide(CloseReason::ProtocolError);
            c.phase = ConnPhase::Closing;
            self.unsubscribe_all(id);
            self.detach(id);
        }
        let head = self.log.head();
        let Some(c) = self.conns.get_mut(id) else { return };
        let mut any = false;
        while let Some(bytes) = c.session.poll_transmit() {
            let word_end = memchr::memchr(b' ', &bytes).unwrap_or(bytes.len());
            let word = CommandWord::parse(&bytes[..word_end]).unwrap_or(CommandWord::Error);
            c.outbox.push_private(head, bytes, word);
            any = true;
        }
        if any || c.close.is_closing() {
            self.wake(id, head, now);
        }
    }

    /// Appends the connections that have output and no write in flight, to be written this
    /// loop turn: first the proven readers (whose sockets took more than
    /// `PROVEN_READER_BYTES`), then the unproven ones whose send queue empties, then the
    /// congested ones ([`Hub::on_send_queue`]), each group in the order it became dirty.
    /// Returns how many proven readers lead the list.
    ///
    /// So while a crowd of workers that stopped reading has its send buffers filled (each
    /// takes a buffer and a receive window before its socket blocks), the readers, proven or
    /// new, are written before any of them in every turn.
    ///
    /// One pass over the dirty list: with thousands of workers that are not proven yet (every
    /// worker of a fresh start), the turn's write budget serves a few of them and requeues the
    /// rest, so this runs over nearly all of them in every turn.
    pub fn take_dirty(&mut self, out: &mut Vec<ConnId>) -> usize {
        let start = out.len();
        let [clear, congested, _] = &mut self.scratch;
        for &id in &self.dirty {
            let Some(c) = self.conns.get_mut(id) else { continue };
            let rank = if c.written > PROVEN_READER_BYTES {
                Rank::Proven
            } else if c.outbox.congested() {
                Rank::Congested
            } else {
                Rank::Clear
            };
            // The first entry of an id takes it: a later duplicate finds it taken.
            if c.outbox.take_dirty() {
                match rank {
                    Rank::Proven => out.push(id),
                    Rank::Clear => clear.push(id),
                    Rank::Congested => congested.push(id),
                }
            }
        }
        let proven = out.len() - start;
        out.append(clear);
        out.append(congested);
        self.dirty.clear();
        proven
    }

    /// Whether `id`'s socket has taken more than a worker that never reads could absorb
    /// ([`PROVEN_READER_BYTES`]): its writes go first in every turn.
    pub fn is_proven_reader(&self, id: ConnId) -> bool {
        self.conns.get(id).is_some_and(|c| c.written > PROVEN_READER_BYTES)
    }

    /// Whether the driver should tell [`Hub::on_send_queue`] what `id`'s socket holds after a
    /// write: only while the answer can change its rank. A proven reader's rank no longer
    /// depends on it, and a send queue cannot hold more than the last measure plus what the
    /// socket took since: while that is at most [`CONGESTED_SEND_QUEUE`], the measure would
    /// find the connection clear. So a reader's writes cost an extra system call once per
    /// 64 KiB it takes before it is proven, not once per write (at 100 lines a second, one in
    /// some 200 writes), and a worker that stopped reading is found out as soon as before.
    pub fn wants_send_queue(&self, id: ConnId) -> bool {
        self.conns
            .get(id)
            .is_some_and(|c| c.written <= PROVEN_READER_BYTES && c.queue_bound > CONGESTED_SEND_QUEUE)
    }

    /// `id`'s socket held `bytes` unsent or unacknowledged after a write (SIOCOUTQ): more than
    /// [`CONGESTED_SEND_QUEUE`] ranks it after the other unproven connections.
    pub fn on_send_queue(&mut self, id: ConnId, bytes: u64) {
        if let Some(c) = self.conns.get_mut(id) {
            c.queue_bound = bytes;
            c.outbox.set_congested(bytes > CONGESTED_SEND_QUEUE);
        }
    }

    /// Whether some connection waits in the dirty list (a driver that ended its turn early, see
    /// [`Hub::requeue_dirty`], must not sleep while this holds).
    pub fn has_dirty(&self) -> bool {
        !self.dirty.is_empty()
    }

    /// Puts back connections taken with [`Hub::take_dirty`] that the driver did not get to
    /// write this turn, ahead of the ones that became dirty since, so that the next turn
    /// serves them first and nobody waits more than a turn behind the others.
    pub fn requeue_dirty(&mut self, ids: &[ConnId]) {
        let mut queue = std::mem::take(&mut self.scratch[2]);
        for &id in ids {
            let Some(c) = self.conns.get_mut(id) else { continue };
            // A taken outbox is pending; this makes it dirty again (or leaves it held back
            // once its `Close` is out), exactly as a socket that became writable would.
            if c.outbox.on_writable(c.close.emitted()) {
                queue.push(id);
            }
        }
        queue.append(&mut self.dirty);
        // The emptied list becomes the scratch, so neither allocates again.
        self.scratch[2] = std::mem::replace(&mut self.dirty, queue);
    }

    /// The socket of a blocked connection is writable again.
    pub fn on_writable(&mut self, id: ConnId) {
        self.unpark(id);
        let Some(c) = self.conns.get_mut(id) else { return };
        if c.outbox.on_writable(c.close.emitted()) {
            self.dirty.push(id);
        }
    }

    /// Fills `iov` with the next gathered write for `id` (at most `max_iov` slices) and marks
    /// it in flight; returns its length. Zero means nothing to write (the connection went
    /// idle, and may have asked to be closed through [`Hub::poll_output`]).
    ///
    /// The slices stay valid until [`Hub::on_written`] or [`Hub::on_peer_closed`] for `id`.
    pub fn gather<'a>(&'a mut self, id: ConnId, iov: &mut Vec<IoSlice<'a>>) -> usize {
        let Some(c) = self.conns.get_mut(id) else { return 0 };
        if c.close.emitted() {
            return 0;
        }
        let broadcast = c.wants_broadcast();
        match c.outbox.gather(&mut self.log, &c.subs, broadcast, &self.config) {
            Gathered::Nothing => 0,
            Gathered::AtHead => {
                self.go_idle(id);
                0
            }
            Gathered::Again => {
                self.dirty.push(id);
                0
            }
            Gathered::Write(total) => {
                // Borrow again, shared and for 'a, to hand out the slices.
                if let Some(c) = self.conns.get(id) {
                    c.outbox.flight_slices(iov);
                }
                total
            }
        }
    }

    /// The outbox goes idle if nothing is left; a closing connection is then closed.
    fn go_idle(&mut self, id: ConnId) {
        let Some(c) = self.conns.get_mut(id) else { return };
        if c.outbox.try_idle(&mut self.log) {
            self.close_if_drained(id);
        }
    }

    /// `n` bytes of the write in flight for `id` were written (`n` may be short or zero). A
    /// short write means the socket is full: the connection waits for [`Hub::on_writable`].
    pub fn on_written(&mut self, id: ConnId, n: usize, now: Now) {
        self.unpark(id);
        let Some(c) = self.conns.get_mut(id) else { return };
        let Some(written) = c.outbox.on_written(&mut self.log, n, now.mono_ms) else { return };
        if n > 0 {
            c.session.on_sent(now);
        }
        c.written += n as u64;
        c.queue_bound += n as u64;
        self.stats.lines_delivered += written.lines;
        self.stats.bytes_delivered += n as u64;
        self.stats.writes += 1;
        match written.next {
            AfterWrite::Idle => self.close_if_drained(id),
            AfterWrite::Dirty => self.dirty.push(id),
            AfterWrite::Blocked => {}
        }
    }

    /// `id`'s write is no longer waiting on its socket: batches wake it again (see
    /// `Hub::parked`).
    fn unpark(&mut self, id: ConnId) {
        if let Some(p) = self.parked.get_mut(id.index as usize) {
            *p = 0;
        }
    }

    /// Everything queued for a closing connection was written: `Close{Graceful}`, once.
    fn close_if_drained(&mut self, id: ConnId) {
        let Some(c) = self.conns.get_mut(id) else { return };
        if let CloseState::Closing(reason) = c.close {
            c.close = CloseState::CloseEmitted(reason);
            self.outputs.push_back(HubOutput::Close { conn: id, how: CloseHow::Graceful });
        }
    }
}
