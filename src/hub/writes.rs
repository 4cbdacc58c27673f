//! Writes: the dirty list, and the glue between the driver's write loop and each connection's
//! [`Outbox`](super::outbox::Outbox) (which plans the writes and accounts for them).
use std::collections::VecDeque;
use std::io::IoSlice;

use super::conn::{CloseState, Conn};
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

/// Which group of the turn's order a dirty connection is in (see [`Hub::next_dirty`]).
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

impl Rank {
    const COUNT: usize = 3;

    #[inline]
    fn of(c: &Conn) -> Self {
        if c.is_proven_reader() {
            Self::Proven
        } else if c.outbox.congested() {
            Self::Congested
        } else {
            Self::Clear
        }
    }
}

/// The dirty list: the connections whose outbox is `Dirty`, one queue per [`Rank`], each in
/// the order they became dirty. A dirty connection is in the queue of its rank; entries that
/// no longer match (the rank changed, or the outbox was taken) are dropped when reached.
#[derive(Default)]
pub(super) struct DirtyQueues([VecDeque<ConnId>; Rank::COUNT]);

impl DirtyQueues {
    /// `id` (whose connection is `c`) became dirty.
    #[inline]
    pub(super) fn push(&mut self, id: ConnId, c: &Conn) {
        self.0[Rank::of(c) as usize].push_back(id);
    }

    fn lens(&self) -> [usize; Rank::COUNT] {
        self.0.each_ref().map(VecDeque::len)
    }

    fn is_empty(&self) -> bool {
        self.0.iter().all(VecDeque::is_empty)
    }
}

/// A loop turn's place in the dirty list ([`Hub::dirty_turn`]).
pub struct DirtyTurn {
    /// Entries of each group the turn has yet to look at.
    left: [usize; Rank::COUNT],
    /// The group it is in.
    group: usize,
}

/// A connection [`Hub::next_dirty`] took for the turn's write.
#[derive(Clone, Copy, Debug)]
pub struct Dirty {
    pub id: ConnId,
    /// A proven reader: its write does not count against the turn's budget for the others.
    pub proven: bool,
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

    /// Where a loop turn starts in the dirty queues: it takes at most what each held then, so
    /// a connection that becomes dirty during the turn waits for the next one.
    pub fn dirty_turn(&self) -> DirtyTurn {
        DirtyTurn { left: self.dirty.lens(), group: 0 }
    }

    /// The next connection this loop turn writes, out of the dirty list: first every proven
    /// reader of the turn (whose socket took more than `PROVEN_READER_BYTES`), then, while
    /// `more_unproven` holds, the unproven ones whose send queue empties, then the congested
    /// ones ([`Hub::on_send_queue`]), each group in the order it became dirty. The connections
    /// the turn leaves stay where they are, first in line for the next turn.
    ///
    /// So while a crowd of workers that stopped reading has its send buffers filled (each
    /// takes a buffer and a receive window before its socket blocks), the readers, proven or
    /// new, are written before any of them in every turn; and a turn whose write budget
    /// reaches a few hundred of thousands of unproven workers (every worker of a fresh start)
    /// touches only those few hundred.
    pub fn next_dirty(&mut self, turn: &mut DirtyTurn, more_unproven: bool) -> Option<Dirty> {
        while turn.group < Rank::COUNT {
            let group = turn.group;
            if group > Rank::Proven as usize && !more_unproven {
                return None;
            }
            if turn.left[group] == 0 {
                turn.group += 1;
                continue;
            }
            turn.left[group] -= 1;
            let Some(id) = self.dirty.0[group].pop_front() else { continue };
            let Some(c) = self.conns.get_mut(id) else { continue };
            // An entry left behind when the connection's rank changed: the connection has one
            // in its new group ([`Hub::on_send_queue`]).
            if Rank::of(c) as usize != group {
                continue;
            }
            // Not dirty: taken through a later entry already (its rank changed and changed
            // back), or no longer waiting to be written.
            if c.outbox.take_dirty() {
                return Some(Dirty { id, proven: group == Rank::Proven as usize });
            }
        }
        None
    }

    /// Takes every connection the turn would write without a budget into `out`, in turn
    /// order ([`Hub::next_dirty`]); returns how many proven readers lead the list. For a loop
    /// that writes all of them (the tests' and benches' sockets, which take everything).
    pub fn take_dirty(&mut self, out: &mut Vec<ConnId>) -> usize {
        let mut turn = self.dirty_turn();
        let mut proven = 0;
        while let Some(next) = self.next_dirty(&mut turn, true) {
            out.push(next.id);
            proven += usize::from(next.proven);
        }
        proven
    }

    /// Whether `id`'s socket has taken more than a worker that never reads could absorb
    /// ([`PROVEN_READER_BYTES`]): its writes go first in every turn.
    pub fn is_proven_reader(&self, id: ConnId) -> bool {
        self.conns.get(id).is_some_and(|c| c.is_proven_reader())
    }

    /// Whether the driver should tell [`Hub::on_send_queue`] what `id`'s socket holds after a
    /// write: only while the answer can change its rank. A proven reader's rank no longer
    /// depends on it, and a send queue cannot hold more than the last measure plus what the
    /// socket took since: while that is at most [`CONGESTED_SEND_QUEUE`], the measure would
    /// find the connection clear. So a reader's writes cost an extra system call once per
    /// 64 KiB it takes before it is proven, not once per write (at 100 lines a second, one in
    /// some 200 writes), and a worker that stopped reading is found out as soon as before.
    pub fn wants_send_queue(&self, id: ConnId) -> bool {
        self.conns.get(id).is_some_and(|c| !c.is_proven_reader() && c.queue_bound > CONGESTED_SEND_QUEUE)
    }

    /// `id`'s socket held `bytes` unsent or unacknowledged after a write (SIOCOUTQ): more than
    /// [`CONGESTED_SEND_QUEUE`] ranks it after the other unproven connections. A dirty
    /// connection whose rank changes moves to its new group's end.
    pub fn on_send_queue(&mut self, id: ConnId, bytes: u64) {
        if let Some(c) = self.conns.get_mut(id) {
            c.queue_bound = bytes;
            let congested = bytes > CONGESTED_SEND_QUEUE;
            if c.outbox.congested() != congested {
                c.outbox.set_congested(congested);
                // Its entry in the old group is skipped when that group's turn comes.
                if c.outbox.is_dirty() {
                    self.dirty.push(id, c);
                }
            }
        }
    }

    /// Whether some connection waits in the dirty list (a driver whose turn left some, see
    /// [`Hub::next_dirty`], must not sleep while this holds).
    pub fn has_dirty(&self) -> bool {
        !self.dirty.is_empty()
    }

    /// The socket of a blocked connection is writable again.
    pub fn on_writable(&mut self, id: ConnId) {
        self.unpark(id);
        let Some(c) = self.conns.get_mut(id) else { return };
        if c.outbox.on_writable(c.close.emitted()) {
            self.dirty.push(id, c);
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
                self.dirty.push(id, c);
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
            AfterWrite::Dirty => self.dirty.push(id, c),
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
