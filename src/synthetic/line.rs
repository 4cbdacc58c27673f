//! The frame of one line: `RDATA <stream> <token> ` and `\n`, the id writer, and padding.
use bytes::{BufMut, BytesMut};

use super::world::EventId;
use crate::proto::json::{write_i64, write_null, write_str_contents};
use crate::proto::{StreamId, Token, MAX_LINE_LEN};

/// The instance name of the main process, in RDATA from Synapse 1.13 on.
pub(crate) const MASTER_INSTANCE: &str = "master";

/// Padding characters: valid in every id localpart we pad.
pub(super) const FILLER: &[u8; 36] = b"abcdefghijklmnopqrstuvwxyz0123456789";

/// Where a line may grow: `at` is a byte offset inside a JSON string of the row; with `wrap`,
/// the filler goes in as an extra array element (`, "…"`) at `at` instead.
#[derive(Clone, Copy, Debug)]
pub(super) struct PadSlot {
    pub(super) at: usize,
    pub(super) wrap: bool,
}

/// The position of one line within its group.
pub(super) struct LineCtx {
    pub(super) stream: StreamId,
    pub(super) token: i64,
    pub(super) rows: usize,
    pub(super) written: usize,
    /// Whether RDATA name the writer's instance (`master`), as from Synapse 1.13.
    pub(super) instance: bool,
    /// Where the current line's row (its JSON) starts in the output.
    pub(super) json_at: usize,
}

impl LineCtx {
    pub(super) fn more(&self) -> bool {
        self.written < self.rows
    }

    /// `batch` for all but the group's last row.
    pub(super) fn token_for_current(&self) -> Token {
        if self.written + 1 < self.rows {
            Token::Batch
        } else {
            Token::Value(self.token)
        }
    }

    /// Writes `RDATA <stream> [master ]<token> ` and returns where the line starts.
    pub(super) fn begin(&mut self, out: &mut BytesMut) -> usize {
        let start = out.len();
        out.put_slice(b"RDATA ");
        out.put_slice(self.stream.name().as_bytes());
        out.put_u8(b' ');
        if self.instance {
            out.put_slice(MASTER_INSTANCE.as_bytes());
            out.put_u8(b' ');
        }
        match self.token_for_current() {
            Token::Batch => out.put_slice(b"batch"),
            Token::Value(t) => write_i64(out, t),
        }
        out.put_u8(b' ');
        self.json_at = out.len();
        start
    }
}

/// Writes an id as a JSON string and returns the offset just after its localpart (before the
/// first `:`, or the first `.` of a server name), where filler may go.
pub(super) fn put_id(out: &mut BytesMut, id: &str) -> PadSlot {
    let cut = id.find(':').or_else(|| id.find('.')).unwrap_or(id.len());
    let (local, rest) = id.split_at(cut);
    out.put_u8(b'"');
    write_str_contents(out, local);
    let at = out.len();
    write_str_contents(out, rest);
    out.put_u8(b'"');
    PadSlot { at, wrap: false }
}

pub(super) fn put_opt_event(out: &mut BytesMut, id: Option<&EventId>) {
    match id {
        Some(id) => {
            out.put_u8(b'"');
            out.put_slice(id);
            out.put_u8(b'"');
        }
        None => write_null(out),
    }
}

pub(super) fn put_filler(out: &mut BytesMut, mut n: usize) {
    while n > 0 {
        let k = n.min(FILLER.len());
        out.put_slice(&FILLER[..k]);
        n -= k;
    }
}

/// Grows the line that started at `start` (not yet `\n`-terminated) to `target - 1` bytes by
/// inserting filler at `slot`. Returns the filler length (0 if the line is long enough).
pub(super) fn pad_line(
    scratch: &mut Vec<u8>,
    out: &mut BytesMut,
    start: usize,
    slot: PadSlot,
    target: usize,
    compact: bool,
) -> usize {
    let sep: &[u8] = if compact { b",\"" } else { b", \"" };
    let target = target.saturating_sub(1).min(MAX_LINE_LEN);
    let overhead = if slot.wrap { sep.len() + 1 } else { 0 };
    let len = out.len() - start;
    if target <= len + overhead {
        return 0;
    }
    let fill = target - len - overhead;
    scratch.clear();
    scratch.extend_from_slice(&out[slot.at..]);
    out.truncate(slot.at);
    if slot.wrap {
        out.put_slice(sep);
    }
    put_filler(out, fill);
    if slot.wrap {
        out.put_u8(b'"');
    }
    out.put_slice(scratch);
    fill
}

/// Rewrites the JSON in `out[from..]` with compact separators, as Synapse 1.19+ encodes rows:
/// the space after each `,` and `:` outside strings goes. Returns how many bytes were removed
/// before offset `mark` (so a position recorded in the old text can be moved).
pub(super) fn compact_separators(out: &mut BytesMut, from: usize, mark: Option<usize>) -> usize {
    let mut write = from;
    let mut in_string = false;
    let mut escaped = false;
    let mut removed_before_mark = 0;
    let mut read = from;
    // The byte before `read` in the original text (the copy may have overwritten it).
    let mut prev = 0u8;
    while read < out.len() {
        let b = out[read];
        let drop_space = !in_string && b == b' ' && matches!(prev, b',' | b':');
        prev = b;
        if drop_space {
            if mark.is_some_and(|m| read < m) {
                removed_before_mark += 1;
            }
        } else {
            if in_string {
                if escaped {
                    escaped = false;
                } else if b == b'\\' {
                    escaped = true;
                } else if b == b'"' {
                    in_string = false;
                }
            } else if b == b'"' {
                in_string = true;
            }
            out[write] = b;
            write += 1;
        }
        read += 1;
    }
    out.truncate(write);
    removed_before_mark
}
