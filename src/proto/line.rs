//! A received line: the bytes plus where the command word ends. Nothing else is parsed.
use bytes::Bytes;

use super::command::CommandWord;

/// The space ending a field a few bytes long (a command word, a stream name, a token, an
/// instance name): a plain scan, which costs less than `memchr`'s vector set-up for the few
/// bytes it looks at (on the relay's hot path, `memchr` per field was among the source thread's
/// largest costs).
#[inline]
pub(crate) fn short_field_end(s: &[u8]) -> Option<usize> {
    s.iter().position(|&b| b == b' ')
}

/// One received line (without its `\n`). Only the command word is located; arguments are
/// parsed on demand by [`super::fields`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Line {
    bytes: Bytes,
    word_end: usize,
}

impl Line {
    /// Wraps a line, locating the first space.
    pub fn new(bytes: Bytes) -> Self {
        let word_end = short_field_end(&bytes).unwrap_or(bytes.len());
        Self { bytes, word_end }
    }
    /// The whole line.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }
    /// The whole line as shared bytes.
    pub fn bytes(&self) -> &Bytes {
        &self.bytes
    }
    /// Gives the bytes back.
    pub fn into_bytes(self) -> Bytes {
        self.bytes
    }
    /// The command word: everything before the first space (the whole line if none).
    pub fn word(&self) -> &[u8] {
        &self.bytes[..self.word_end]
    }
    /// The recognised command, if the word is one.
    pub fn command(&self) -> Option<CommandWord> {
        CommandWord::parse(self.word())
    }
    /// Whether the line has a space after the word (a one-word line has none).
    pub fn has_args(&self) -> bool {
        self.word_end < self.bytes.len()
    }
    /// Everything after the first space (empty for a one-word line).
    pub fn args(&self) -> &[u8] {
        self.bytes.get(self.word_end + 1..).unwrap_or(&[])
    }
    /// The arguments as shared bytes (no copy).
    pub fn args_bytes(&self) -> Bytes {
        self.bytes.slice((self.word_end + 1).min(self.bytes.len())..)
    }
}
