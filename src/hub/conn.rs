//! One worker connection as the hub sees it.
use std::collections::VecDeque;
use std::sync::Arc;

use bytes::Bytes;
use smallvec::SmallVec;

use super::log::{Batch, Seq};
use super::ConnId;
use crate::metrics::snapshot::{CloseReason, ConnPhase, WORDS};
use crate::proto::{CommandWord, StreamId, StreamMask};
use crate::session::Session;

/// A private line (SERVER, PING, POSITION, ERROR, ...) for one connection, ordered with the log:
/// it goes out before log line `at`.
pub(super) struct Private {
    pub at: Seq,
    pub bytes: Bytes,
    pub word: CommandWord,
    /// The rest of a line whose beginning was already written: it must go out whole.
    pub partial: bool,
}

/// A piece of an in-flight write, remembered so that `on_written` can account for it even
/// after the connection's plan changed (eviction) and so that its bytes outlive the write.
pub(super) enum Piece {
    /// Part of a private line.
    Private { line: Private, skip: usize },
    /// Lines `[first, end)` of a batch, the first one starting at byte `skip` within it.
    Log { batch: Arc<Batch>, first: usize, end: usize, skip: usize, first_seq: u64 },
}

impl Piece {
    pub fn len(&self) -> usize {
        match self {
            Self::Private { line, skip } => line.bytes.len() - skip,
            Self::Log { batch, first, end, skip, .. } => {
                let lines = batch.lines();
                (lines[*end - 1].end - lines[*first].start) as usize - skip
            }
        }
    }
}

/// Per-connection hub state.
pub(super) struct Conn {
    pub id: ConnId,
    pub session: Session,
    pub phase: ConnPhase,
    /// Next log line to consider, and bytes of it already written.
    pub cursor: Seq,
    pub offset: usize,
    /// Whether the connection has (or may have) pending output.
    pub active: bool,
    /// Closing: the connection wants no more log lines, so its cursor pins nothing; only its
    /// private lines (the ERROR, the rest of a half-written line) remain.
    pub detached: bool,
    /// In the hub's dirty list.
    pub dirty: bool,
    /// The socket is full: wait for `on_writable`.
    pub blocked: bool,
    pub in_flight: Option<SmallVec<[Piece; 4]>>,
    /// Bytes gathered for the write in flight.
    pub flight_len: usize,
    /// Where the cursor lands if the write in flight completes: set when the gather reached
    /// the head (it also skipped lines this connection does not want).
    pub flight_end: Option<u64>,
    /// The plan changed while a write was in flight (eviction): account for the write, but
    /// do not move the cursor by it.
    pub replanned: bool,
    /// Every line from this sequence number on is wanted (`u64::MAX` unless subscribed to all).
    pub full_from: u64,
    pub mask: StreamMask,
    /// Stream `s` is delivered from log line `sub_from[s]` on.
    pub sub_from: [u64; StreamId::COUNT],
    /// Streams whose REPLICATE waits for a batch boundary or for the upstream's tokens.
    pub pending: StreamMask,
    pub private: VecDeque<Private>,
    /// When the connection last made write progress, or started waiting with output pending.
    pub progress_ms: u64,
    pub name: Option<String>,
    pub inbound: [u64; WORDS],
    pub outbound: [u64; WORDS],
    /// Set once we decided to close: the reason, and whether `Close` was emitted.
    pub closing: Option<CloseReason>,
    pub close_emitted: bool,
    pub abort_emitted: bool,
}

impl Conn {
    pub fn new(id: ConnId, session: Session, phase: ConnPhase, head: Seq, now_ms: u64) -> Self {
        Self {
            id,
            session,
            phase,
            cursor: head,
            offset: 0,
            active: false,
            detached: false,
            dirty: false,
            blocked: false,
            in_flight: None,
            flight_len: 0,
            flight_end: None,
            replanned: false,
            full_from: u64::MAX,
            mask: StreamMask::NONE,
            sub_from: [0; StreamId::COUNT],
            pending: StreamMask::NONE,
            private: VecDeque::new(),
            progress_ms: now_ms,
            name: None,
            inbound: [0; WORDS],
            outbound: [0; WORDS],
            closing: None,
            close_emitted: false,
            abort_emitted: false,
        }
    }

    /// Whether the cursor holds a pin in the log.
    pub fn pins(&self) -> bool {
        self.active && !self.detached
    }

    /// Whether log line `seq` of `stream` (index, or BROADCAST) goes to this connection.
    #[inline]
    pub fn wants(&self, stream: u8, seq: u64) -> bool {
        match StreamId::from_index(stream as usize) {
            Some(s) => self.mask.contains(s) && seq >= self.sub_from[s.index()],
            None => self.closing.is_none() && self.phase != ConnPhase::Waiting,
        }
    }

    /// Recomputes [`Conn::full_from`] after a subscription change.
    pub fn refresh_full_from(&mut self) {
        self.full_from =
            if self.mask.is_all() { self.sub_from.iter().copied().max().unwrap_or(0) } else { u64::MAX };
    }

    pub fn display_name(&self) -> &str {
        self.name.as_deref().unwrap_or("anon")
    }
}
