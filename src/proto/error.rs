//! Errors. [`PeerError`]'s `Display` is the exact text after `ERROR ` (PROTOCOL.md §1.4).
use bytes::{BufMut, Bytes, BytesMut};

use super::pyrepr::{py_bytes_repr, py_repr, py_repr_truncated};
use super::splitter::MAX_LINE_LEN;

/// Why we tell a peer `ERROR ...` and close. `Display` is the wire text.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerError {
    /// `Line length exceeded`
    #[error("Line length exceeded")]
    LineTooLong,
    /// `invalid command: <name>`: unknown word or wrong direction.
    #[error("invalid command: {0}")]
    InvalidCommand(String),
    /// `failed to parse line for  '<name>': <detail> ('<rest>'):`
    #[error(
        "failed to parse line for  {}: {} ({}):",
        super::pyrepr::py_repr(name),
        detail,
        super::pyrepr::py_repr(rest)
    )]
    Parse {
        /// The command word.
        name: String,
        /// A Python-style exception repr, e.g. `ValueError('...')`.
        detail: String,
        /// The argument text.
        rest: String,
    },
    /// `ping timeout`
    #[error("ping timeout")]
    PingTimeout,
    /// `Failed to keep up`
    #[error("Failed to keep up")]
    FailedToKeepUp,
    /// `failed to handle replicate: Exception('unknown stream %s', '<name>')`
    #[error("failed to handle replicate: Exception('unknown stream %s', {})", super::pyrepr::py_repr(.0))]
    UnknownStream(String),
    /// `failed to handle replicate: <exception>`: a REPLICATE the server cannot serve, e.g. a
    /// 1.10–1.12 master's `Exception('stream events has fallen behind')`.
    #[error("failed to handle replicate: {0}")]
    ReplicateFailed(String),
    /// `server shutting down`
    #[error("server shutting down")]
    ShuttingDown,
    /// `Wrong remote`
    #[error("Wrong remote")]
    WrongRemote,
    /// `failed to parse line: <detail> ('<line>'):`: how Synapse 1.13+ reports a line it
    /// cannot parse, e.g. an unknown command word (`KeyError('<word>')`).
    #[error("failed to parse line: {} ({}):", detail, super::pyrepr::py_repr(line))]
    LineParse {
        /// A Python-style exception repr.
        detail: String,
        /// The whole received line.
        line: String,
    },
    /// `too many users syncing on this connection (at most <n>)`: a worker announced a sync
    /// for more distinct users than `--max-user-syncs` allows (replhub's own bound; the
    /// reference keeps them all).
    #[error("too many users syncing on this connection (at most {0})")]
    TooManyUserSyncs(usize),
}

impl PeerError {
    /// What Synapse 1.13+ answers a line whose command word it does not know:
    /// `failed to parse line: KeyError('<word>') ('<line>'):`.
    pub fn unknown_command(line: &[u8]) -> Self {
        let line = String::from_utf8_lossy(line).into_owned();
        let word = line.split(' ').next().unwrap_or_default();
        Self::LineParse { detail: super::pyrepr::py_exc("KeyError", word), line: line.clone() }
    }

    /// A parse failure of `args` for command `name` with the given exception text.
    pub fn parse(name: &[u8], args: &[u8], detail: FieldError) -> Self {
        Self::Parse {
            name: String::from_utf8_lossy(name).into_owned(),
            detail: detail.0,
            rest: String::from_utf8_lossy(args).into_owned(),
        }
    }

    /// The whole `ERROR <text>\n` line, never longer than [`MAX_LINE_LEN`] bytes without its
    /// `\n`, so an ERROR can always be sent (the reference fails to send over-long ones and
    /// drops the connection instead). If the text does not fit, the embedded peer data is cut:
    /// for a parse error the `rest` repr first (then the detail), keeping the text up to and
    /// including `': ` exact; `...` marks the cut.
    pub fn to_line(&self) -> Bytes {
        const BUDGET: usize = MAX_LINE_LEN - "ERROR ".len();
        let full = self.to_string();
        let text = if full.len() <= BUDGET {
            full
        } else {
            match self {
                Self::Parse { name, detail, rest } => {
                    let head = format!("failed to parse line for  {}: ", py_repr_truncated(name, 1024));
                    // What is left for `<detail> (<rest repr>):`, keeping >= 64 bytes for rest.
                    let left = BUDGET - head.len() - " ():".len();
                    let detail = truncate_str(detail, left - 64);
                    let rest = py_repr_truncated(rest, left - detail.len());
                    format!("{head}{detail} ({rest}):")
                }
                Self::LineParse { detail, line } => {
                    let head = "failed to parse line: ";
                    let left = BUDGET - head.len() - " ():".len();
                    let detail = truncate_str(detail, left - 64);
                    let line = py_repr_truncated(line, left - detail.len());
                    format!("{head}{detail} ({line}):")
                }
                Self::InvalidCommand(word) => {
                    let head = "invalid command: ";
                    format!("{head}{}", truncate_str(word, BUDGET - head.len()))
                }
                Self::UnknownStream(name) => {
                    let head = "failed to handle replicate: Exception('unknown stream %s', ";
                    format!("{head}{})", py_repr_truncated(name, BUDGET - head.len() - 1))
                }
                _ => truncate_str(&full, BUDGET).into_owned(),
            }
        };
        // A received line never holds a `\n`, but a hand-made error might: escape it, as a
        // `\n` would end the ERROR line early.
        let text = if text.contains('\n') { text.replace('\n', "\\n") } else { text };
        let text = truncate_str(&text, BUDGET);
        let mut out = BytesMut::with_capacity("ERROR ".len() + text.len() + 1);
        out.put_slice(b"ERROR ");
        out.put_slice(text.as_bytes());
        out.put_u8(b'\n');
        out.freeze()
    }
}

/// The longest prefix of `s` of at most `max` bytes, cut at a character boundary, with `...`
/// appended when something was cut (the result is then at most `max` bytes too).
fn truncate_str(s: &str, max: usize) -> std::borrow::Cow<'_, str> {
    if s.len() <= max {
        return s.into();
    }
    let mut end = max.saturating_sub(3);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end]).into()
}

/// A field failed to parse. The string is a Python-style exception repr
/// (`ValueError("invalid literal for int() with base 10: 'x'")`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct FieldError(pub String);

impl FieldError {
    /// Python's `UnicodeDecodeError('utf-8', b'<bytes>', start, end, '<reason>')` for `bytes`
    /// that failed strict UTF-8 decoding with `err`.
    pub fn unicode(bytes: &[u8], err: &std::str::Utf8Error) -> Self {
        let start = err.valid_up_to();
        let (end, reason) = match err.error_len() {
            None => (bytes.len(), "unexpected end of data"),
            Some(n) => match bytes.get(start) {
                // Bytes that can never start a UTF-8 sequence.
                Some(0x80..=0xc1 | 0xf5..=0xff) => (start + 1, "invalid start byte"),
                _ => (start + n, "invalid continuation byte"),
            },
        };
        Self(format!(
            "UnicodeDecodeError('utf-8', {}, {start}, {end}, {})",
            py_bytes_repr(bytes),
            py_repr(reason)
        ))
    }
}

/// A command that must not be written (PROTOCOL.md §1.3).
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// The line would exceed 16384 bytes.
    #[error("Failed to send command {word} as too long ({len} > 16384)")]
    TooLong {
        /// The command word.
        word: &'static str,
        /// The encoded length without `\n`.
        len: usize,
    },
    /// The line would contain a `\n`.
    #[error("Failed to send command {word}: it contains a newline")]
    ContainsNewline {
        /// The command word.
        word: &'static str,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_is_the_wire_text() {
        let e = PeerError::Parse {
            name: "FEDERATION_ACK".into(),
            detail: "ValueError(\"invalid literal for int() with base 10: 'x'\")".into(),
            rest: "x".into(),
        };
        assert_eq!(
            e.to_string(),
            "failed to parse line for  'FEDERATION_ACK': ValueError(\"invalid literal for int() with base 10: 'x'\") ('x'):"
        );
        assert_eq!(PeerError::InvalidCommand(String::new()).to_string(), "invalid command: ");
        assert_eq!(
            PeerError::UnknownStream("events 5".into()).to_string(),
            "failed to handle replicate: Exception('unknown stream %s', 'events 5')"
        );
        assert_eq!(&PeerError::LineTooLong.to_line()[..], b"ERROR Line length exceeded\n");
    }

    #[test]
    fn unicode_errors_like_python() {
        fn decode_error(bytes: &[u8]) -> String {
            let e = std::str::from_utf8(bytes).unwrap_err();
            FieldError::unicode(bytes, &e).0
        }
        assert_eq!(
            decode_error(b"NAME \xff\xfe"),
            "UnicodeDecodeError('utf-8', b'NAME \\xff\\xfe', 5, 6, 'invalid start byte')"
        );
        assert!(decode_error(b"ab\xe2\x28").ends_with(", 2, 3, 'invalid continuation byte')"));
        assert!(decode_error(b"ab\xf0\x9f\x98").ends_with(", 2, 5, 'unexpected end of data')"));
    }

    #[test]
    fn error_lines_always_fit() {
        let huge = "a\u{2028}".repeat(20_000);
        let cases = [
            PeerError::parse(b"RDATA", huge.as_bytes(), FieldError("JSONDecodeError('x')".into())),
            PeerError::parse(b"RDATA", b"x", FieldError(huge.clone())),
            PeerError::parse(huge.as_bytes(), huge.as_bytes(), FieldError(huge.clone())),
            PeerError::InvalidCommand(huge.clone()),
            PeerError::UnknownStream(huge.clone()),
        ];
        for e in cases {
            let line = e.to_line();
            assert!(line.len() <= MAX_LINE_LEN + 1, "{}", line.len());
            assert!(line.starts_with(b"ERROR ") && line.ends_with(b"\n"));
            assert_eq!(memchr::memchr(b'\n', &line), Some(line.len() - 1));
            assert!(std::str::from_utf8(&line).is_ok());
        }
        let e = PeerError::parse(b"RDATA", huge.as_bytes(), FieldError("JSONDecodeError('x')".into()));
        assert!(e
            .to_line()
            .starts_with(b"ERROR failed to parse line for  'RDATA': JSONDecodeError('x') ('a\\u2028"));
        let short = PeerError::parse(b"RDATA", b"x", FieldError("E('y')".into()));
        assert_eq!(short.to_line(), format!("ERROR {short}\n").as_bytes());
    }
}
