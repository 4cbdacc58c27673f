//! The wire protocol, sans-IO: line splitting, command words, lazy field parsing, encoding
//! and the Synapse-compatible JSON that replhub emits (PROTOCOL.md §1–2).
//!
//! Nothing here does I/O, reads the clock or allocates per line on the relay path: a received
//! line is a [`Line`] (a `Bytes` plus the end of its command word); fields are parsed only when a
//! handler asks, with the `parse_*` functions of [`fields`].

pub mod command;
pub mod encode;
pub mod error;
pub mod fields;
pub mod generation;
pub mod inbound;
pub mod json;
pub mod line;
pub mod number;
pub mod pyrepr;
pub mod release;
pub mod splitter;
pub mod stream;

pub use command::{Command, CommandWord, Role};
pub use error::{EncodeError, FieldError, PeerError};
pub use fields::{
    FederationAck, InvalidateCache, Position, Rdata, RemovePusher, ReplicateTarget, SyncState, Token, UserIp,
    UserSync,
};
pub use generation::{Generation, ProtocolChoice};
pub use inbound::{check_command, parse_args, parse_line, parse_line_strict};
pub use line::Line;
pub use release::SynapseRelease;
pub use splitter::{LineSplitter, LineTooLong, MAX_LINE_LEN};
pub use stream::{StreamId, StreamMask};
