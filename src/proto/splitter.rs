//! Line splitting with memchr over a reusable buffer (PROTOCOL.md §1.1 steps 1–3).
//!
//! Modelled on the `LinesCodec` of the async runtime's codec utilities: "need more bytes" is
//! `Ok(None)`, the scan resumes where it stopped (a long unterminated line is not rescanned on
//! every read), and after an over-long line the splitter discards input up to the next `\n`
//! before resuming.
//!
//! Lines are split off the buffer as `Bytes` without copying; once every line of an
//! allocation has been dropped, the buffer's `reserve` reuses that allocation.
use bytes::{Buf, Bytes, BytesMut};

/// Longest line accepted or sent, in bytes, excluding the `\n`.
pub const MAX_LINE_LEN: usize = 16384;

/// A complete or unterminated line exceeded the limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("Line length exceeded")]
pub struct LineTooLong;

/// Splits a byte stream into lines at `\n`.
///
/// Rules (Twisted's `LineOnlyReceiver` as used by Synapse, with replhub's blank-line policy):
/// only `\n` ends a line (`\r` is data); empty lines are skipped; a complete line longer than
/// `max_len`, or an unterminated tail longer than `max_len`, is [`LineTooLong`]. Unterminated
/// data held between calls never exceeds `max_len` plus what the last read appended.
#[derive(Debug)]
pub struct LineSplitter {
    buf: BytesMut,
    max_len: usize,
    /// `buf[..scanned]` is known to contain no `\n`.
    scanned: usize,
    /// After an over-long unterminated line: drop input up to and including the next `\n`.
    discarding: bool,
    /// Return empty lines from [`Self::next_line`] instead of skipping them.
    keep_blank: bool,
}

/// Finds an empty line inside a chunk. Shared: a finder is ~300 bytes, too much to keep per
/// connection.
static BLANK: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
    std::sync::LazyLock::new(|| memchr::memmem::Finder::new(b"\n\n"));

impl LineSplitter {
    /// A splitter enforcing `max_len` (normally [`MAX_LINE_LEN`]).
    pub fn new(max_len: usize) -> Self {
        Self { buf: BytesMut::new(), max_len, scanned: 0, discarding: false, keep_blank: false }
    }

    /// From now on [`Self::next_line`] returns empty lines too, for a peer that answers them
    /// (a Synapse 1.13+ master's blank-line check never matches, so it parses the empty line
    /// and fails with `KeyError('')`). [`Self::next_chunk`] still never includes one.
    pub fn keep_blank_lines(&mut self) {
        self.keep_blank = true;
    }

    /// Copies received bytes in.
    pub fn extend_from_slice(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// Gives a large, now empty buffer back to the allocator, so that thousands of idle
    /// connections hold no read buffers.
    pub fn release_if_empty(&mut self) {
        if self.buf.is_empty() && self.buf.capacity() > 1024 {
            self.buf = BytesMut::new();
            self.scanned = 0;
        }
    }

    /// The buffer to read into directly (no copy): reserve, then read into its spare capacity.
    /// Only append to it; bytes already in it must stay as they are.
    pub fn buffer_mut(&mut self) -> &mut BytesMut {
        &mut self.buf
    }

    /// Whether the splitter is skipping the rest of an over-long line.
    pub fn is_discarding(&self) -> bool {
        self.discarding
    }

    /// The next complete line without its `\n`, skipping empty ones (unless
    /// [`Self::keep_blank_lines`]). `Ok(None)` means "need more bytes".
    pub fn next_line(&mut self) -> Result<Option<Bytes>, LineTooLong> {
        loop {
            if !self.skip_discarded() {
                return Ok(None);
            }
            let Some(nl) = self.find_newline() else {
                return self.check_tail().map(|()| None);
            };
            if nl > self.max_len {
                self.drop_through(nl);
                return Err(LineTooLong);
            }
            self.scanned = 0;
            if nl == 0 && !self.keep_blank {
                self.buf.advance(1);
                continue;
            }
            let line = self.buf.split_to(nl).freeze();
            self.buf.advance(1);
            return Ok(Some(line));
        }
    }

    /// All complete lines currently buffered, as one chunk ending in `\n` (no copy), for a
    /// relay that forwards lines as they are: the same lines as [`Self::next_line`] gives.
    /// A chunk never holds an empty line (a seed Synapse drops the connection on one): the
    /// chunk stops before it and the next call skips it. If an over-long line sits among the
    /// buffered lines, the lines before it are returned first and the error on the next call.
    pub fn next_chunk(&mut self) -> Result<Option<Bytes>, LineTooLong> {
        if !self.skip_discarded() {
            return Ok(None);
        }
        let blank = self.buf.iter().take_while(|&&b| b == b'\n').count();
        if blank > 0 {
            self.buf.advance(blank);
            self.scanned = 0;
        }
        let start = self.scanned.min(self.buf.len());
        let Some(last) = memchr::memrchr(b'\n', &self.buf[start..]).map(|i| start + i) else {
            self.scanned = self.buf.len();
            return self.check_tail().map(|()| None);
        };
        // A line starting at `line_start` is within the limit iff a `\n` lies in the next
        // `max_len + 1` bytes. Jumping to the last `\n` of each such window checks every line
        // while touching only a few bytes per window.
        let mut line_start = 0;
        while last - line_start > self.max_len {
            let window = &self.buf[line_start..=line_start + self.max_len];
            match memchr::memrchr(b'\n', window) {
                Some(i) => line_start += i + 1,
                None => break,
            }
        }
        let end = if last - line_start > self.max_len {
            if line_start == 0 {
                // The first line is over-long: drop it through its `\n`.
                let nl = memchr::memchr(b'\n', &self.buf).unwrap_or(last);
                self.drop_through(nl);
                return Err(LineTooLong);
            }
            line_start
        } else {
            last + 1
        };
        // Stop after the line before an empty one.
        let end = BLANK.find(&self.buf[..end]).map_or(end, |p| p + 1);
        self.scanned = 0;
        Ok(Some(self.buf.split_to(end).freeze()))
    }

    /// Bytes buffered and not yet returned.
    pub fn buffered_len(&self) -> usize {
        self.buf.len()
    }

    /// In discard mode, drops input through the next `\n`. Returns whether there may be more
    /// to split (false: everything buffered was discarded).
    fn skip_discarded(&mut self) -> bool {
        if !self.discarding {
            return true;
        }
        match memchr::memchr(b'\n', &self.buf) {
            Some(nl) => {
                self.buf.advance(nl + 1);
                self.discarding = false;
                self.scanned = 0;
                true
            }
            None => {
                self.buf.clear();
                self.scanned = 0;
                false
            }
        }
    }

    /// The index of the first `\n`, scanning only bytes not scanned before.
    fn find_newline(&mut self) -> Option<usize> {
        let start = self.scanned.min(self.buf.len());
        match memchr::memchr(b'\n', &self.buf[start..]) {
            Some(i) => Some(start + i),
            None => {
                self.scanned = self.buf.len();
                None
            }
        }
    }

    /// No `\n` is buffered: an unterminated tail over the limit is an error, and what follows
    /// up to the next `\n` is discarded.
    fn check_tail(&mut self) -> Result<(), LineTooLong> {
        if self.buf.len() > self.max_len {
            self.buf.clear();
            self.scanned = 0;
            self.discarding = true;
            return Err(LineTooLong);
        }
        Ok(())
    }

    /// Drops a complete over-long line ending at `nl`, its `\n` included.
    fn drop_through(&mut self, nl: usize) {
        self.buf.advance(nl + 1);
        self.scanned = 0;
    }
}

impl Default for LineSplitter {
    fn default() -> Self {
        Self::new(MAX_LINE_LEN)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(s: &mut LineSplitter) -> Vec<Result<Bytes, LineTooLong>> {
        let mut out = Vec::new();
        loop {
            match s.next_line() {
                Ok(Some(l)) => out.push(Ok(l)),
                Ok(None) => return out,
                Err(e) => out.push(Err(e)),
            }
        }
    }

    #[test]
    fn splits_on_lf_only_and_skips_empty_lines() {
        let mut s = LineSplitter::new(100);
        s.extend_from_slice(b"PING 1\r\n\nNAME x\n   \nREPL");
        let got = lines(&mut s);
        assert_eq!(got, vec![Ok(Bytes::from("PING 1\r")), Ok("NAME x".into()), Ok("   ".into())]);
        assert_eq!(s.buffered_len(), 4);
        s.extend_from_slice(b"ICATE ALL\n");
        assert_eq!(lines(&mut s), vec![Ok(Bytes::from("REPLICATE ALL"))]);
        assert_eq!(s.buffered_len(), 0);
    }

    #[test]
    fn empty_lines_kept_on_request() {
        let mut s = LineSplitter::new(100);
        s.extend_from_slice(b"NAME x\n");
        assert_eq!(lines(&mut s), vec![Ok(Bytes::from("NAME x"))]);
        s.keep_blank_lines();
        s.extend_from_slice(b"\n\nPING 1\n\n");
        let got = lines(&mut s);
        assert_eq!(got, vec![Ok(Bytes::new()), Ok(Bytes::new()), Ok("PING 1".into()), Ok(Bytes::new())]);
    }

    #[test]
    fn limit_is_inclusive() {
        let mut s = LineSplitter::new(8);
        s.extend_from_slice(b"12345678\n123456789\nok\n");
        assert_eq!(lines(&mut s), vec![Ok(Bytes::from("12345678")), Err(LineTooLong), Ok("ok".into())]);
        let mut s = LineSplitter::new(8);
        s.extend_from_slice(b"12345678");
        assert_eq!(s.next_line(), Ok(None));
        s.extend_from_slice(b"9");
        assert_eq!(s.next_line(), Err(LineTooLong));
        assert!(s.is_discarding());
        assert_eq!(s.buffered_len(), 0);
        s.extend_from_slice(b"more garbage");
        assert_eq!(s.next_line(), Ok(None));
        assert_eq!(s.buffered_len(), 0);
        s.extend_from_slice(b"tail\nPING 1\n");
        assert_eq!(lines(&mut s), vec![Ok(Bytes::from("PING 1"))]);
    }

    #[test]
    fn resumes_scanning_where_it_stopped() {
        let mut s = LineSplitter::new(MAX_LINE_LEN);
        for _ in 0..100 {
            s.extend_from_slice(&[b'a'; 100]);
            assert_eq!(s.next_line(), Ok(None));
            assert_eq!(s.scanned, s.buffered_len());
        }
        s.extend_from_slice(b"\n");
        assert_eq!(s.next_line().unwrap().map(|l| l.len()), Some(10_000));
    }

    #[test]
    fn chunks_stop_before_an_overlong_line() {
        let mut s = LineSplitter::new(8);
        s.extend_from_slice(b"\n\na\nb\n\n123456789\nc\nd");
        assert_eq!(s.next_chunk(), Ok(Some(Bytes::from("a\nb\n"))));
        assert_eq!(s.next_chunk(), Err(LineTooLong));
        assert_eq!(s.next_chunk(), Ok(Some(Bytes::from("c\n"))));
        assert_eq!(s.next_chunk(), Ok(None));
        assert_eq!(s.buffered_len(), 1);
        let mut s = LineSplitter::new(8);
        s.extend_from_slice(b"0123456789");
        assert_eq!(s.next_chunk(), Err(LineTooLong));
        s.extend_from_slice(b"xx\nok\n");
        assert_eq!(s.next_chunk(), Ok(Some(Bytes::from("ok\n"))));
    }

    #[test]
    fn reads_into_the_buffer_directly() {
        let mut s = LineSplitter::default();
        let buf = s.buffer_mut();
        buf.reserve(64);
        buf.extend_from_slice(b"SERVER example.com\nPI");
        assert_eq!(s.next_line(), Ok(Some(Bytes::from("SERVER example.com"))));
        assert_eq!(s.next_line(), Ok(None));
    }
}
