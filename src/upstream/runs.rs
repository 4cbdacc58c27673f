//! `batch` runs in the relayed lines (ARCHITECTURE.md §3 item 4): where a run that is still
//! open ends a chunk, and where a held run is completed.
//!
//! A run is a stream's `RDATA <stream> batch <row>` lines up to and including its next RDATA
//! with a numbered token. A worker keeps the rows of an open run pending and applies them at
//! the numbered line; a run cut short by the upstream's drop would stay pending in it, and its
//! next POSITION would fail on those rows. So the link relays only complete runs: these helpers
//! tell it which lines to hold back.
use crate::hub::LineMeta;
use crate::proto::StreamMask;

/// Streams whose run is open after `lines`, given the streams open before them.
pub(super) fn open_after(lines: &[LineMeta], mut open: StreamMask) -> StreamMask {
    for m in lines {
        step(m, &mut open);
    }
    open
}

/// Where the lines that closed every run open before them end: the byte offset after the first
/// line at which no run is open, given the streams open before `lines`. `None` if a run is
/// still open after the last line.
pub(super) fn completion(lines: &[LineMeta], mut open: StreamMask) -> Option<u32> {
    if open.is_empty() {
        return Some(0);
    }
    for m in lines {
        step(m, &mut open);
        if open.is_empty() {
            return Some(m.end);
        }
    }
    None
}

/// Where the runs still open at the end of `lines` begin: the start of the first line of the
/// earliest one, and the streams open. `None` if every run is complete.
pub(super) fn open_tail(lines: &[LineMeta]) -> Option<(u32, StreamMask)> {
    let mut open = StreamMask::NONE;
    let mut start: Option<u32> = None;
    for m in lines {
        step(m, &mut open);
        if open.is_empty() {
            start = None;
        } else if start.is_none() {
            start = Some(m.start);
        }
    }
    start.map(|s| (s, open))
}

/// One line's effect on the set of open runs: `batch` opens its stream's run, a numbered
/// token closes it; broadcast lines do nothing.
fn step(m: &LineMeta, open: &mut StreamMask) {
    if let Some(s) = m.stream_id() {
        if m.token.is_none() {
            open.insert(s);
        } else {
            open.remove(s);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::BROADCAST;
    use crate::proto::StreamId;

    fn line(k: u32, stream: StreamId, token: Option<i64>) -> LineMeta {
        LineMeta { start: k * 10, end: k * 10 + 10, stream: stream as u8, token }
    }

    #[test]
    fn an_open_tail_starts_at_the_earliest_open_run() {
        use StreamId::{Caches, Events};
        let lines = [
            line(0, Events, Some(1)),
            line(1, Events, None),
            line(2, Caches, None),
            line(3, Caches, Some(4)),
            line(4, Events, None),
        ];
        let mut expect = StreamMask::NONE;
        expect.insert(Events);
        assert_eq!(open_tail(&lines), Some((10, expect)));
        assert_eq!(open_tail(&lines[..1]), None);
        assert_eq!(open_tail(&lines[1..4]), Some((10, expect)), "events is still open");
        let done = [line(0, Events, None), line(1, Events, Some(2))];
        assert_eq!(open_tail(&done), None);
        let b = LineMeta { start: 0, end: 10, stream: BROADCAST, token: None };
        assert_eq!(open_tail(&[b]), None, "a broadcast line is no run");
    }

    #[test]
    fn completion_is_the_end_of_the_line_that_closes_the_last_open_run() {
        use StreamId::{Caches, Events};
        let mut open = StreamMask::NONE;
        open.insert(Events);
        let lines = [
            line(0, Events, None),
            line(1, Caches, None),
            line(2, Events, Some(5)),
            line(3, Caches, Some(9)),
        ];
        assert_eq!(completion(&lines, open), Some(40));
        assert_eq!(completion(&lines[..3], open), None, "caches opened and is still open");
        assert_eq!(completion(&lines, StreamMask::NONE), Some(0));
        assert_eq!(open_after(&lines[..2], open).iter().count(), 2);
    }
}
