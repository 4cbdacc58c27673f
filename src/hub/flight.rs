//! The record of a gathered write while the driver performs it, and its accounting once the
//! driver reports how much was written.
use std::collections::VecDeque;
use std::sync::Arc;

use bytes::Bytes;
use smallvec::SmallVec;

use super::log::{Batch, Seq};
use super::stats::WORDS;
use crate::proto::CommandWord;

/// A private line (SERVER, PING, POSITION, ERROR, ...) for one connection, ordered with the log:
/// it goes out before log line `at`.
pub(super) struct Private {
    pub at: Seq,
    pub bytes: Bytes,
    pub word: CommandWord,
    /// The rest of a line whose beginning was already written: it must go out whole.
    pub partial: bool,
}

/// A piece of an in-flight write, remembered so that the write can be accounted for even
/// after the connection's plan changed (detach) and so that its bytes outlive the write.
pub(super) enum Piece {
    /// Part of a private line.
    Private { line: Private, skip: usize },
    /// Lines `[first, end)` of a batch, the first one starting at byte `skip` within it.
    Log { batch: Arc<Batch>, first: usize, end: usize, skip: usize, first_seq: u64 },
}

impl Piece {
    /// Bytes in the piece.
    pub(super) fn len(&self) -> usize {
        match self {
            Self::Private { line, skip } => line.bytes.len() - skip,
            Self::Log { batch, first, end, skip, .. } => {
                let lines = batch.lines();
                (lines[*end - 1].end - lines[*first].start) as usize - skip
            }
        }
    }

    /// The bytes to write.
    pub(super) fn bytes(&self) -> &[u8] {
        match self {
            Self::Private { line, skip } => &line.bytes[*skip..],
            Self::Log { batch, first, end, skip, .. } => {
                let lines = batch.lines();
                &batch.data()[lines[*first].start as usize + skip..lines[*end - 1].end as usize]
            }
        }
    }
}

/// The gathered write the driver is performing.
pub(super) struct Flight {
    pub pieces: SmallVec<[Piece; 4]>,
    /// Bytes gathered.
    pub len: usize,
    /// Where the cursor lands if the whole write completes: set when the gather reached the
    /// head (it also skipped lines this connection does not want).
    pub end: Option<u64>,
    /// The connection detached while the write was in flight: account for the write, but do
    /// not move the cursor by it.
    pub replanned: bool,
    /// Bytes of private lines among the pieces: the outbox counts them as its own until the
    /// write is settled (they are unwritten and held until then).
    pub private_bytes: u64,
    /// Private lines among the pieces.
    pub private_lines: usize,
    /// Bytes of catch-up RDATA (private lines of word RDATA) among the pieces.
    pub catch_up_bytes: u64,
}

/// What a write of part of a flight amounts to. Small, so that it comes back in registers:
/// the private lines to requeue go straight to the queue.
pub(super) struct Settled {
    /// Whole log lines written.
    pub lines: u64,
    /// Where the cursor moves (log line, bytes of it written); `None` to leave it (nothing of
    /// the log written, or a replanned flight).
    pub cursor: Option<(u64, usize)>,
    /// Bytes of the private lines (and rests of lines) put back at the front of the queue.
    pub requeued_bytes: u64,
    /// The part of `requeued_bytes` that is whole catch-up RDATA (see `Outbox::catch_up_bytes`).
    pub requeued_catch_up: u64,
}

impl Flight {
    /// Accounts for the first `n` bytes of the flight having been written, and empties it.
    /// `cursor` is where a replanned flight's half-written log line is requeued; whole private
    /// lines written are counted in `outbound`; private lines, and rests of half-written
    /// lines, go back to the front of `private`, in order.
    ///
    /// The flight is drained in place rather than taken by value: it is a few hundred bytes,
    /// and moving it on every write showed in the per-batch instruction counts.
    pub(super) fn settle(
        &mut self,
        n: usize,
        cursor: Seq,
        outbound: &mut [u64; WORDS],
        private: &mut VecDeque<Private>,
    ) -> Settled {
        let (requested, flight_end, replanned) = (self.len, self.end, self.replanned);
        let mut left = n;
        let mut lines = 0u64;
        let mut requeue: SmallVec<[Private; 4]> = SmallVec::new();
        let mut new_cursor: Option<(u64, usize)> = None;
        let mut complete = true;
        for piece in self.pieces.drain(..) {
            let len = piece.len();
            if left >= len && complete {
                left -= len;
                match piece {
                    Piece::Private { line, .. } => {
                        if !line.partial {
                            outbound[line.word as usize] += 1;
                        }
                    }
                    Piece::Log { first, end, first_seq, .. } => {
                        lines += (end - first) as u64;
                        new_cursor = Some((first_seq + (end - first) as u64, 0));
                    }
                }
            } else if complete && left > 0 {
                complete = false;
                match piece {
                    Piece::Private { line, skip } => {
                        let rest = line.bytes.slice(skip + left..);
                        requeue.push(Private { at: line.at, bytes: rest, word: line.word, partial: true });
                    }
                    Piece::Log { batch, first, end, skip, first_seq } => {
                        let metas = batch.lines();
                        let base = metas[first].start as usize;
                        let pos = base + skip + left;
                        // The line holding byte `pos`: the last one starting at or before it.
                        let k = first + metas[first..end].partition_point(|m| (m.start as usize) <= pos) - 1;
                        lines += (k - first) as u64;
                        let within = pos - metas[k].start as usize;
                        if replanned {
                            let rest = batch.data().slice(pos..metas[k].end as usize);
                            requeue.push(Private {
                                at: cursor,
                                bytes: rest,
                                word: CommandWord::Rdata,
                                partial: true,
                            });
                        } else {
                            new_cursor = Some((first_seq + (k - first) as u64, within));
                        }
                    }
                }
                left = 0;
            } else {
                complete = false;
                if let Piece::Private { line, skip } = piece {
                    if replanned && skip == 0 && !line.partial {
                        continue;
                    }
                    let bytes = if skip > 0 { line.bytes.slice(skip..) } else { line.bytes };
                    requeue.push(Private {
                        at: line.at,
                        bytes,
                        word: line.word,
                        partial: line.partial || skip > 0,
                    });
                }
            }
        }
        let (mut requeued_bytes, mut requeued_catch_up) = (0, 0);
        for p in requeue.into_iter().rev() {
            requeued_bytes += p.bytes.len() as u64;
            if p.word == CommandWord::Rdata && !p.partial {
                requeued_catch_up += p.bytes.len() as u64;
            }
            private.push_front(p);
        }
        if replanned {
            return Settled { lines, cursor: None, requeued_bytes, requeued_catch_up };
        }
        if complete && n == requested {
            if let Some(end) = flight_end {
                new_cursor = Some((end, 0));
            }
        }
        Settled { lines, cursor: new_cursor, requeued_bytes, requeued_catch_up }
    }
}
