//! The per-core log of shared batches.
//!
//! An upstream read becomes one [`Batch`]: a `Bytes` holding complete lines exactly as they
//! came off the wire, plus an index ([`LineMeta`] per relayed line: byte range, stream, token).
//! The same `Arc<Batch>` is appended to every core's [`Log`]; connections hold cursors into it
//! (global line sequence numbers), so a line is stored once and never copied per subscriber.
//! Each log entry counts the cursors parked in it ("pins"); entries with no pins at the front are
//! dropped, which bounds memory by the slowest connection's backlog.
use std::collections::VecDeque;
use std::sync::Arc;

use bytes::Bytes;

use crate::proto::StreamId;

/// `LineMeta::stream` value for lines delivered to every connection (`REMOTE_SERVER_UP`).
pub(crate) const BROADCAST: u8 = u8::MAX;

/// `LineMeta::stream` value for a Redis-mode message (`*3 message <channel> <payload>`): it
/// goes to the RESP connections subscribed to the channel whose id the line carries
/// ([`LineMeta::channel`]). A batch holds either only such lines or none.
pub(crate) const PUBSUB: u8 = u8::MAX - 1;

/// Where one relayed line sits in its batch and what it carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LineMeta {
    /// Byte offset of the line in [`Batch::data`].
    pub start: u32,
    /// Byte offset one past the line's `\n`.
    pub end: u32,
    /// Stream index (`StreamId as u8`) or `BROADCAST`.
    pub stream: u8,
    /// The RDATA token; `None` for `batch` (the run continues) and for broadcast lines.
    pub token: Option<i64>,
}

impl LineMeta {
    /// A Redis-mode message of channel `channel` at `start..end`. The channel id travels in
    /// the token field, which pub/sub lines have no other use for (keeping the index 32 bytes
    /// a line).
    pub(crate) fn pubsub(start: u32, end: u32, channel: u32) -> Self {
        Self { start, end, stream: PUBSUB, token: Some(i64::from(channel)) }
    }

    /// The channel id of a Redis-mode message.
    #[inline]
    pub(crate) fn channel(&self) -> Option<u32> {
        if self.stream == PUBSUB {
            self.token.and_then(|t| u32::try_from(t).ok())
        } else {
            None
        }
    }

    /// The stream, if this is an RDATA line.
    pub fn stream_id(&self) -> Option<StreamId> {
        StreamId::from_index(self.stream as usize)
    }

    /// Line length including `\n`.
    pub const fn len(&self) -> usize {
        (self.end - self.start) as usize
    }

    /// Whether the line is empty (never true for an indexed line).
    pub const fn is_empty(&self) -> bool {
        self.end == self.start
    }
}

/// Complete lines from one upstream read (or one synthetic burst), shared by every core.
#[derive(Debug)]
pub struct Batch {
    data: Bytes,
    lines: Vec<LineMeta>,
    /// `run_end[i]`: one past the last line of the byte-contiguous run holding line `i`, so a
    /// subscriber to every stream takes a whole run as one slice in O(1). Redis-mode messages
    /// on different channels are in different runs, so a channel's subscriber takes a run of
    /// that channel's messages the same way.
    run_end: Vec<u32>,
    /// `stream_run_end[i]`: the same, for the run of line `i`'s stream alone (a run of
    /// [`Batch::run_end`] cut where the stream changes), so a subscriber to some streams takes
    /// a run of a stream it wants in one step instead of line by line.
    stream_run_end: Vec<u32>,
}

impl Batch {
    /// A batch over `data` with the given index. Ranges must be in order, inside `data`, end
    /// in `\n` and not overlap (checked in debug builds).
    pub fn new(data: Bytes, lines: Vec<LineMeta>) -> Self {
        debug_assert!(lines.windows(2).all(|w| w[0].end <= w[1].start));
        debug_assert!(lines
            .iter()
            .all(|l| l.start < l.end && (l.end as usize) <= data.len() && data[l.end as usize - 1] == b'\n'));
        let mut run_end = vec![0u32; lines.len()];
        let mut stream_run_end = vec![0u32; lines.len()];
        let (mut end, mut stream_end) = (lines.len() as u32, lines.len() as u32);
        for i in (0..lines.len()).rev() {
            run_end[i] = end;
            stream_run_end[i] = stream_end;
            if i > 0 && (lines[i - 1].end != lines[i].start || lines[i - 1].channel() != lines[i].channel()) {
                end = i as u32;
                stream_end = i as u32;
            } else if i > 0 && lines[i - 1].stream != lines[i].stream {
                stream_end = i as u32;
            }
        }
        Self { data, lines, run_end, stream_run_end }
    }

    /// One past the last line of the contiguous run that holds line `i`.
    pub fn run_end(&self, i: usize) -> usize {
        self.run_end[i] as usize
    }

    /// One past the last line of the contiguous run of line `i`'s stream (or channel) that
    /// holds line `i`.
    pub fn stream_run_end(&self, i: usize) -> usize {
        self.stream_run_end[i] as usize
    }

    /// The raw bytes.
    pub fn data(&self) -> &Bytes {
        &self.data
    }

    /// The index.
    pub fn lines(&self) -> &[LineMeta] {
        &self.lines
    }

    /// Line `i` with its `\n`.
    pub fn line(&self, i: usize) -> &[u8] {
        let m = self.lines[i];
        &self.data[m.start as usize..m.end as usize]
    }

    /// Bytes of indexed lines.
    pub fn line_bytes(&self) -> usize {
        self.lines.iter().map(LineMeta::len).sum()
    }
}

struct Entry {
    batch: Arc<Batch>,
    /// Sequence number of the batch's line 0.
    first_seq: u64,
    /// Cumulative log byte offset of the batch's line 0 (indexed bytes only).
    first_byte: u64,
    /// Cumulative byte offset of each line's start, relative to `first_byte`.
    offsets: Vec<u32>,
    pins: u32,
}

/// A position in the log: the next line to deliver.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Seq(pub u64);

/// The per-core log.
#[derive(Default)]
pub struct Log {
    entries: VecDeque<Entry>,
    head_seq: u64,
    head_byte: u64,
    held_bytes: u64,
    /// Cursors parked at the head: they pin whatever batch is appended next.
    head_pins: u32,
}

impl Log {
    /// An empty log.
    pub fn new() -> Self {
        Self::default()
    }

    /// The position after the last appended line.
    pub fn head(&self) -> Seq {
        Seq(self.head_seq)
    }

    /// Cumulative bytes appended so far (position of the head in bytes).
    pub fn head_byte(&self) -> u64 {
        self.head_byte
    }

    /// Bytes currently held in memory by the log's batches (indexed lines only).
    pub fn held_bytes(&self) -> u64 {
        self.held_bytes
    }

    /// Number of batches held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the log holds no batch.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Appends a batch; returns the sequence number of its first line.
    pub fn append(&mut self, batch: Arc<Batch>) -> Seq {
        let first = Seq(self.head_seq);
        if batch.lines().is_empty() {
            return first;
        }
        let mut offsets = Vec::with_capacity(batch.lines().len());
        let mut acc = 0u32;
        for l in batch.lines() {
            offsets.push(acc);
            acc += l.end - l.start;
        }
        let n = batch.lines().len() as u64;
        self.entries.push_back(Entry {
            batch,
            first_seq: self.head_seq,
            first_byte: self.head_byte,
            offsets,
            pins: std::mem::take(&mut self.head_pins),
        });
        self.head_seq += n;
        self.head_byte += u64::from(acc);
        self.held_bytes += u64::from(acc);
        first
    }

    fn entry_index(&self, seq: Seq) -> Option<usize> {
        if seq.0 >= self.head_seq {
            return None;
        }
        // Readers keep up, so their cursors are in the last batch: no search through a log
        // that a crowd of stalled workers holds long.
        if let Some(last) = self.entries.back() {
            if last.first_seq <= seq.0 {
                return Some(self.entries.len() - 1);
            }
        }
        let i = self.entries.partition_point(|e| e.first_seq <= seq.0);
        if i == 0 {
            None
        } else {
            Some(i - 1)
        }
    }

    /// The batch holding `seq` and the line's index in it.
    pub fn locate(&self, seq: Seq) -> Option<(&Arc<Batch>, usize)> {
        let i = self.entry_index(seq)?;
        let e = &self.entries[i];
        Some((&e.batch, (seq.0 - e.first_seq) as usize))
    }

    /// Cumulative byte position of the line at `seq` (the head's if `seq` is at the head).
    pub fn byte_of(&self, seq: Seq) -> u64 {
        match self.entry_index(seq) {
            Some(i) => {
                let e = &self.entries[i];
                e.first_byte + u64::from(e.offsets[(seq.0 - e.first_seq) as usize])
            }
            None => self.head_byte,
        }
    }

    /// Records a cursor parked at `seq`. A cursor at the head pins the next batch appended.
    pub fn pin(&mut self, seq: Seq) {
        match self.entry_index(seq) {
            Some(i) => self.entries[i].pins += 1,
            None => {
                debug_assert!(seq.0 >= self.head_seq, "pin of a trimmed position");
                self.head_pins += 1;
            }
        }
    }

    /// Releases a cursor parked at `seq`, then drops unpinned batches from the front.
    pub fn unpin(&mut self, seq: Seq) {
        match self.entry_index(seq) {
            Some(i) => {
                let e = &mut self.entries[i];
                debug_assert!(e.pins > 0, "unpin of an unpinned entry");
                e.pins = e.pins.saturating_sub(1);
            }
            None => {
                debug_assert!(self.head_pins > 0, "unpin of an unpinned head");
                self.head_pins = self.head_pins.saturating_sub(1);
            }
        }
        self.trim();
    }

    /// Moves a cursor from `from` to `to` (`to >= from`).
    pub fn repin(&mut self, from: Seq, to: Seq) {
        if self.entry_index(from) == self.entry_index(to) {
            return;
        }
        self.pin(to);
        self.unpin(from);
    }

    /// Drops batches at the front that no cursor needs.
    pub fn trim(&mut self) {
        while let Some(e) = self.entries.front() {
            if e.pins != 0 {
                break;
            }
            let bytes = self.entries.front().map_or(0, |e| {
                e.offsets.last().map_or(0, |o| u64::from(*o))
                    + e.batch.lines().last().map_or(0, |l| l.len() as u64)
            });
            self.held_bytes -= bytes;
            self.entries.pop_front();
        }
    }

    /// Iterates entries from the one holding `seq`: `(batch, first line index, seq of that line)`.
    pub fn entries_from(&self, seq: Seq) -> impl Iterator<Item = (&Arc<Batch>, usize, u64)> {
        let start = self.entry_index(seq);
        let skip = start.unwrap_or(self.entries.len());
        self.entries.iter().skip(skip).map(move |e| {
            let first = if e.first_seq <= seq.0 { (seq.0 - e.first_seq) as usize } else { 0 };
            (&e.batch, first, e.first_seq + first as u64)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(lines: &[&str]) -> Arc<Batch> {
        let mut data = Vec::new();
        let mut metas = Vec::new();
        for l in lines {
            let start = data.len() as u32;
            data.extend_from_slice(l.as_bytes());
            data.push(b'\n');
            metas.push(LineMeta { start, end: data.len() as u32, stream: 0, token: Some(1) });
        }
        Arc::new(Batch::new(Bytes::from(data), metas))
    }

    #[test]
    fn append_locate_and_trim() {
        let mut log = Log::new();
        assert_eq!(log.append(batch(&["a", "bb"])), Seq(0));
        assert_eq!(log.append(batch(&["ccc"])), Seq(2));
        assert_eq!(log.head(), Seq(3));
        assert_eq!(log.held_bytes(), 2 + 3 + 4);
        let (b, i) = log.locate(Seq(1)).unwrap();
        assert_eq!(b.line(i), b"bb\n");
        assert_eq!(log.byte_of(Seq(2)), 5);
        assert_eq!(log.byte_of(Seq(3)), 9);
        log.pin(Seq(2));
        log.trim();
        assert_eq!(log.len(), 1, "the unpinned first batch goes");
        assert_eq!(log.held_bytes(), 4);
        assert!(log.locate(Seq(0)).is_none());
        log.repin(Seq(2), Seq(3));
        assert!(log.is_empty());
        assert_eq!(log.held_bytes(), 0);
    }

    #[test]
    fn a_cursor_at_the_head_pins_the_next_batch() {
        let mut log = Log::new();
        log.append(batch(&["a"]));
        log.pin(Seq(0));
        log.pin(Seq(1));
        log.append(batch(&["b"]));
        log.unpin(Seq(0));
        assert_eq!(log.len(), 1, "the batch holding the parked cursor stays");
        assert_eq!(log.locate(Seq(1)).map(|(b, i)| b.line(i).to_vec()), Some(b"b\n".to_vec()));
        log.unpin(Seq(1));
        assert!(log.is_empty());
    }

    #[test]
    fn runs_break_where_bytes_are_not_contiguous() {
        let data = Bytes::from_static(
            b"a
PING x
b
c
",
        );
        let m = |start, end| LineMeta { start, end, stream: 0, token: None };
        let b = Batch::new(data, vec![m(0, 2), m(9, 11), m(11, 13)]);
        assert_eq!((b.run_end(0), b.run_end(1), b.run_end(2)), (1, 3, 3));
    }

    #[test]
    fn stream_runs_break_where_the_stream_changes_as_well() {
        // Streams 0 0 1 | 0 2 2 0: an unindexed line ("xx") between lines 2 and 3.
        let data = Bytes::from_static(b"0\n1\n2\nxx\n3\n4\n5\n6\n");
        let m = |start, stream| LineMeta { start, end: start + 2, stream, token: None };
        let b = Batch::new(data, vec![m(0, 0), m(2, 0), m(4, 1), m(9, 0), m(11, 2), m(13, 2), m(15, 0)]);
        let runs: Vec<usize> = (0..7).map(|i| b.run_end(i)).collect();
        let stream_runs: Vec<usize> = (0..7).map(|i| b.stream_run_end(i)).collect();
        assert_eq!(runs, [3, 3, 3, 7, 7, 7, 7]);
        assert_eq!(stream_runs, [2, 2, 3, 4, 6, 6, 7]);
    }
}
