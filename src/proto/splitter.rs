//! Line splitting with memchr over a reusable buffer (PROTOCOL.md §1.1 steps 1–3).
use bytes::{Bytes, BytesMut};

/// Longest line accepted or sent, in bytes, excluding the `\n`.
pub const MAX_LINE_LEN: usize = 16384;

/// A complete or unterminated line exceeded the limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("Line length exceeded")]
pub struct LineTooLong;

/// Splits a byte stream into lines at `\n`.
pub struct LineSplitter {
    buf: BytesMut,
    max_len: usize,
}

impl LineSplitter {
    /// A splitter enforcing `max_len` (normally [`MAX_LINE_LEN`]).
    pub fn new(max_len: usize) -> Self {
        Self { buf: BytesMut::new(), max_len }
    }
    /// Copies received bytes in.
    pub fn extend_from_slice(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }
    /// The buffer to read into directly (no copy): reserve, then read into its spare capacity.
    pub fn buffer_mut(&mut self) -> &mut BytesMut {
        &mut self.buf
    }
    /// The next complete, non-empty line without its `\n`. `Ok(None)` means "need more bytes".
    pub fn next_line(&mut self) -> Result<Option<Bytes>, LineTooLong> {
        let _ = self.max_len;
        todo!()
    }
    /// All complete lines currently buffered, as one chunk ending in `\n` (no copy).
    pub fn next_chunk(&mut self) -> Result<Option<Bytes>, LineTooLong> {
        todo!()
    }
    /// Bytes buffered and not yet returned.
    pub fn buffered_len(&self) -> usize {
        self.buf.len()
    }
}
