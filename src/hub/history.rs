//! The bounded per-stream history a 1.10–1.12 worker is caught up from (PROTOCOL.md §8.1,
//! docs/protocol.md "Synapse 1.10–1.12").
//!
//! Such a worker subscribes with `REPLICATE <stream> <token>` and its master answers with
//! every row after `token`, each as an RDATA line with its own token (never `batch`), then
//! `POSITION <stream> <current>`, then live rows. The hub keeps the most recent relayed
//! batches (the same `Arc<Batch>`es as the log, so the bytes are shared with the log and with
//! the other cores) up to a byte budget, with each RDATA row's token resolved (a `batch` row
//! takes the token of the numbered row that ends its run). Per stream it knows its *floor*:
//! every row with a token above the floor is held. A worker whose token is at or above the
//! floor is caught up from here; for an older one the rows up to the floor are fetched from the
//! master first (`subscribe.rs`), or, without a 1.10–1.12 master to ask, the hub answers as
//! such a master does for a stream that has fallen behind.
//!
//! Rows are selected by token (`from < token <= upto`), as the master's `update_function`
//! does, not by position, so a stream whose rows are not in token order (`device_lists`
//! within a token) is served the same rows.
use std::collections::VecDeque;
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};

use super::log::Batch;
use crate::proto::StreamId;

/// Default budget of the history, per core (the batches are shared, so cores holding the
/// same batches cost this once).
pub(crate) const DEFAULT_HISTORY_BYTES: u64 = 16 << 20;

/// Catch-up lines are queued in pieces of about this many bytes.
const PIECE_BYTES: usize = 64 << 10;

/// One RDATA row held: its line in the entry's batch and its token (resolved).
#[derive(Clone, Copy, Debug)]
struct Row {
    line: u32,
    stream: u8,
    /// `None` while the row's `batch` run is open.
    token: Option<i64>,
}

/// One batch held, with its rows.
struct Entry {
    batch: Arc<Batch>,
    rows: Vec<Row>,
}

/// Per-stream bookkeeping.
#[derive(Clone, Debug, Default)]
struct StreamState {
    /// Every row with a token above this is held; `None`: no upstream position known yet.
    floor: Option<i64>,
    /// Rows of a run whose token is not known yet were evicted: the floor becomes the token
    /// that ends the run.
    floor_at_next: bool,
    /// Rows of this stream in entries before this sequence number belong to an earlier
    /// upstream connection whose tokens do not continue into this one.
    epoch: u64,
    /// Rows of the open run: (entry sequence number, row index).
    open: Vec<(u64, u32)>,
}

/// Why a catch-up cannot be served from the history.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Behind {
    /// The token is below the floor: rows after it were evicted (or never seen).
    Floor(Option<i64>),
}

/// The history. See the [module docs](self).
pub(crate) struct History {
    limit: u64,
    bytes: u64,
    /// Sequence number of `entries[0]`.
    first_seq: u64,
    entries: VecDeque<Entry>,
    streams: [StreamState; StreamId::COUNT],
}

impl History {
    /// An empty history holding at most `limit` bytes of batches.
    pub(crate) fn new(limit: u64) -> Self {
        Self { limit, bytes: 0, first_seq: 0, entries: VecDeque::new(), streams: Default::default() }
    }

    /// Forgets everything (the upstream is not of the 1.10 generation).
    pub(crate) fn clear(&mut self) {
        *self = Self::new(self.limit);
    }

    /// Bytes of the batches held.
    pub(crate) fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The stream's floor: every row with a greater token is held (`None` before the upstream
    /// gave a position). What the metrics show as how far back the history reaches.
    pub(crate) fn floor(&self, s: StreamId) -> Option<i64> {
        let st = &self.streams[s.index()];
        if st.floor_at_next {
            return None;
        }
        st.floor
    }

    /// The upstream (re)connected with `position` for `s`. If it equals `token`, the last
    /// token the hub relayed, the history continues (a 1.10 master resumed, or nothing
    /// happened in between); otherwise rows held for `s` are forgotten and the floor is the
    /// new position (tokens may even go backwards after a master restart).
    pub(crate) fn on_connected(&mut self, s: StreamId, token: Option<i64>, position: Option<i64>) {
        let st = &mut self.streams[s.index()];
        if position.is_some() && position == token && st.floor.is_some() {
            return;
        }
        st.floor = position;
        st.floor_at_next = false;
        st.open.clear();
        st.epoch = self.first_seq + self.entries.len() as u64;
    }

    /// Appends a relayed batch (complete lines, `batch` runs possibly still open) and evicts
    /// the oldest batches beyond the budget.
    pub(crate) fn append(&mut self, batch: &Arc<Batch>) {
        let seq = self.first_seq + self.entries.len() as u64;
        let mut rows = Vec::new();
        for (i, meta) in batch.lines().iter().enumerate() {
            let Some(s) = meta.stream_id() else { continue };
            let st = &mut self.streams[s.index()];
            let idx = rows.len() as u32;
            rows.push(Row { line: i as u32, stream: s.index() as u8, token: meta.token });
            match meta.token {
                None => st.open.push((seq, idx)),
                Some(token) => {
                    if st.floor_at_next {
                        st.floor = Some(st.floor.map_or(token, |f| f.max(token)));
                        st.floor_at_next = false;
                    }
                    for (eseq, r) in std::mem::take(&mut st.open) {
                        if eseq == seq {
                            rows[r as usize].token = Some(token);
                        } else if let Some(e) = self.entries.get_mut((eseq - self.first_seq) as usize) {
                            e.rows[r as usize].token = Some(token);
                        }
                    }
                }
            }
        }
        if rows.is_empty() {
            // Nothing to hold, but the sequence must still advance past nothing: keep as is.
            return;
        }
        self.bytes += batch.data().len() as u64;
        self.entries.push_back(Entry { batch: Arc::clone(batch), rows });
        while self.bytes > self.limit {
            if !self.evict_front() {
                break;
            }
        }
    }

    /// Drops the oldest batch, raising the floors of the streams it held rows of.
    fn evict_front(&mut self) -> bool {
        let Some(entry) = self.entries.pop_front() else { return false };
        let seq = self.first_seq;
        self.first_seq += 1;
        self.bytes -= entry.batch.data().len() as u64;
        for row in &entry.rows {
            let st = &mut self.streams[row.stream as usize];
            if seq < st.epoch {
                continue;
            }
            match row.token {
                Some(t) => st.floor = Some(st.floor.map_or(t, |f| f.max(t))),
                None => {
                    st.floor_at_next = true;
                    st.open.retain(|&(e, _)| e != seq);
                }
            }
        }
        true
    }

    /// The catch-up for `REPLICATE <s> <from>` answered with `POSITION <s> <upto>`: every row
    /// with `from < token <= upto`, one RDATA line each with its own token, in pieces of about
    /// 64 KiB. `Err` if rows after `from` are no longer (or never were) held.
    pub(crate) fn catch_up(&self, s: StreamId, from: i64, upto: i64) -> Result<Vec<Bytes>, Behind> {
        let st = &self.streams[s.index()];
        match st.floor {
            Some(floor) if !st.floor_at_next && from >= floor => {}
            floor => return Err(Behind::Floor(floor)),
        }
        let mut pieces = Vec::new();
        let mut buf = BytesMut::new();
        if from >= upto {
            return Ok(pieces);
        }
        let start = st.epoch.saturating_sub(self.first_seq) as usize;
        for entry in self.entries.iter().skip(start) {
            for row in entry.rows.iter().filter(|r| r.stream as usize == s.index()) {
                let Some(token) = row.token else { continue };
                if token <= from || token > upto {
                    continue;
                }
                put_row(&mut buf, entry.batch.line(row.line as usize), token);
                if buf.len() >= PIECE_BYTES {
                    pieces.push(buf.split().freeze());
                }
            }
        }
        if !buf.is_empty() {
            pieces.push(buf.freeze());
        }
        Ok(pieces)
    }
}

/// Appends RDATA `line` (`RDATA <s> <tok|batch> <json>\n`, the seed's and 1.10's form) with
/// its token field set to `token`: a 1.10–1.12 master sends catch-up rows each with its own
/// token.
fn put_row(buf: &mut BytesMut, line: &[u8], token: i64) {
    // "RDATA " then the stream name, then the token field; the index guarantees both spaces.
    let after_stream = memchr::memchr(b' ', &line[6..]).map(|i| 6 + i + 1);
    let after_token = after_stream.and_then(|a| memchr::memchr(b' ', &line[a..]).map(|i| a + i));
    match (after_stream, after_token) {
        (Some(a), Some(b)) if &line[a..b] != b"batch" => buf.put_slice(line),
        (Some(a), Some(b)) => {
            buf.put_slice(&line[..a]);
            buf.put_slice(itoa::Buffer::new().format(token).as_bytes());
            buf.put_slice(&line[b..]);
        }
        _ => buf.put_slice(line),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::LineMeta;
    use StreamId::{Events, Typing};

    /// A batch of seed-form RDATA lines: (stream, token or `None` for `batch`).
    fn batch(rows: &[(StreamId, Option<i64>, &str)]) -> Arc<Batch> {
        let mut data = Vec::new();
        let mut metas = Vec::new();
        for &(s, t, row) in rows {
            let start = data.len() as u32;
            let tok = t.map_or("batch".to_owned(), |t| t.to_string());
            data.extend_from_slice(format!("RDATA {} {tok} {row}\n", s.name()).as_bytes());
            metas.push(LineMeta { start, end: data.len() as u32, stream: s.index() as u8, token: t });
        }
        Arc::new(Batch::new(Bytes::from(data), metas))
    }

    fn text(pieces: &[Bytes]) -> Vec<String> {
        pieces
            .iter()
            .flat_map(|p| {
                String::from_utf8(p.to_vec()).unwrap().lines().map(str::to_owned).collect::<Vec<_>>()
            })
            .collect()
    }

    fn connected(h: &mut History, s: StreamId, position: i64) {
        h.on_connected(s, None, Some(position));
    }

    #[test]
    fn rows_after_the_token_each_with_its_own_token() {
        let mut h = History::new(1 << 20);
        connected(&mut h, Events, 10);
        h.append(&batch(&[(Events, Some(11), "[\"a\"]"), (Typing, Some(3), "[\"t\"]")]));
        h.append(&batch(&[(Events, None, "[\"b\"]"), (Events, Some(12), "[\"c\"]")]));
        let all = text(&h.catch_up(Events, 10, 12).unwrap());
        assert_eq!(all, ["RDATA events 11 [\"a\"]", "RDATA events 12 [\"b\"]", "RDATA events 12 [\"c\"]"]);
        assert_eq!(
            text(&h.catch_up(Events, 11, 12).unwrap()),
            ["RDATA events 12 [\"b\"]", "RDATA events 12 [\"c\"]"]
        );
        assert!(h.catch_up(Events, 12, 12).unwrap().is_empty(), "at the current token: nothing");
        assert!(h.catch_up(Events, 40, 12).unwrap().is_empty(), "ahead of the hub: nothing");
        assert_eq!(text(&h.catch_up(Events, 10, 11).unwrap()), ["RDATA events 11 [\"a\"]"], "upto bounds it");
        assert_eq!(h.catch_up(Events, 9, 12), Err(Behind::Floor(Some(10))), "older than the floor");
    }

    #[test]
    fn a_run_spanning_batches_gets_its_token_when_it_ends() {
        let mut h = History::new(1 << 20);
        connected(&mut h, Events, 0);
        h.append(&batch(&[(Events, None, "[1]")]));
        assert!(h.catch_up(Events, 0, 0).unwrap().is_empty());
        h.append(&batch(&[(Events, None, "[2]"), (Events, Some(5), "[3]")]));
        assert_eq!(
            text(&h.catch_up(Events, 0, 5).unwrap()),
            ["RDATA events 5 [1]", "RDATA events 5 [2]", "RDATA events 5 [3]"]
        );
    }

    #[test]
    fn eviction_raises_the_floor_by_whole_batches() {
        let b1 = batch(&[(Events, Some(1), "[1]"), (Typing, Some(7), "[7]")]);
        let b2 = batch(&[(Events, Some(2), "[2]")]);
        let limit = (b1.data().len() + b2.data().len()) as u64;
        let mut h = History::new(limit);
        connected(&mut h, Events, 0);
        connected(&mut h, Typing, 6);
        h.append(&b1);
        h.append(&b2);
        assert_eq!((h.floor(Events), h.bytes()), (Some(0), limit));
        h.append(&batch(&[(Events, Some(3), "[3]")]));
        assert_eq!(h.floor(Events), Some(1), "the first batch went");
        assert_eq!(h.floor(Typing), Some(7));
        assert_eq!(h.catch_up(Events, 0, 3), Err(Behind::Floor(Some(1))));
        assert_eq!(text(&h.catch_up(Events, 1, 3).unwrap()), ["RDATA events 2 [2]", "RDATA events 3 [3]"]);
        assert!(h.bytes() <= limit);
    }

    #[test]
    fn evicting_part_of_an_open_run_moves_the_floor_to_its_end() {
        let b1 = batch(&[(Events, None, "[1]")]);
        let mut h = History::new(b1.data().len() as u64 + 1);
        connected(&mut h, Events, 0);
        h.append(&b1);
        h.append(&batch(&[(Events, None, "[2]"), (Events, Some(4), "[3]")]));
        h.append(&batch(&[(Events, Some(5), "[5]")]));
        assert_eq!(h.floor(Events), Some(4), "both batches of the run ending at 4 went, that of 5 stays");
        assert_eq!(text(&h.catch_up(Events, 4, 5).unwrap()), ["RDATA events 5 [5]"]);
        let mut h = History::new(b1.data().len() as u64 + 1);
        connected(&mut h, Events, 0);
        h.append(&b1);
        h.append(&batch(&[(Events, None, "[2]")]));
        assert_eq!(h.floor(Events), None, "unknown until the run ends");
        assert!(h.catch_up(Events, 0, 0).is_err());
        h.append(&batch(&[(Events, Some(4), "[3]")]));
        assert_eq!(h.floor(Events), Some(4));
    }

    #[test]
    fn a_reconnect_at_other_tokens_forgets_the_stream() {
        let mut h = History::new(1 << 20);
        connected(&mut h, Typing, 0);
        connected(&mut h, Events, 0);
        h.append(&batch(&[(Typing, Some(1), "[1]"), (Events, Some(1), "[e]")]));
        // The master restarted: typing starts again from 0; events continue.
        h.on_connected(Typing, Some(1), Some(0));
        h.on_connected(Events, Some(1), Some(1));
        h.append(&batch(&[(Typing, Some(1), "[new]")]));
        assert_eq!(text(&h.catch_up(Typing, 0, 1).unwrap()), ["RDATA typing 1 [new]"]);
        assert_eq!(text(&h.catch_up(Events, 0, 1).unwrap()), ["RDATA events 1 [e]"], "continued");
    }

    #[test]
    fn large_catch_ups_come_in_pieces() {
        let mut h = History::new(64 << 20);
        connected(&mut h, Events, 0);
        let row = format!("[\"{}\"]", "x".repeat(1000));
        for t in 1..=200 {
            h.append(&batch(&[(Events, Some(t), &row)]));
        }
        let pieces = h.catch_up(Events, 0, 200).unwrap();
        assert!(pieces.len() >= 3, "{}", pieces.len());
        assert!(pieces.iter().all(|p| p.ends_with(b"\n")));
        let lines = text(&pieces);
        assert_eq!(lines.len(), 200);
        assert!(lines[199].starts_with("RDATA events 200 "));
    }
}
