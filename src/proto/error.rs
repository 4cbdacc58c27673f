//! Errors. [`PeerError`]'s `Display` is the exact text after `ERROR ` (PROTOCOL.md §1.4).

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
    #[error("failed to parse line for  {}: {} ({}):", super::pyrepr::py_repr(name), detail, super::pyrepr::py_repr(rest))]
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
    /// `server shutting down`
    #[error("server shutting down")]
    ShuttingDown,
    /// `Wrong remote`
    #[error("Wrong remote")]
    WrongRemote,
}

impl PeerError {
    /// A parse failure of `args` for command `name` with the given exception text.
    pub fn parse(name: &[u8], args: &[u8], detail: FieldError) -> Self {
        Self::Parse {
            name: String::from_utf8_lossy(name).into_owned(),
            detail: detail.0,
            rest: String::from_utf8_lossy(args).into_owned(),
        }
    }
}

/// A field failed to parse. The string is a Python-style exception repr
/// (`ValueError("invalid literal for int() with base 10: 'x'")`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct FieldError(pub String);

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
