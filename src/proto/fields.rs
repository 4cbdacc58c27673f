//! Lazy, typed field parsing for each command (PROTOCOL.md §2). Each `parse_*` takes the
//! argument bytes of a [`super::Line`] and borrows from them.
use super::error::FieldError;
use super::stream::StreamId;

/// An RDATA token: a number, or `batch` (more rows with the same token follow).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Token {
    /// `batch`
    Batch,
    /// A numeric token.
    Value(i64),
}

/// `RDATA <stream> <token|batch> <row_json>`; the row is left untouched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rdata<'a> {
    /// Stream name as sent (may be unknown to us).
    pub stream: &'a str,
    /// Token.
    pub token: Token,
    /// Row JSON bytes, unparsed.
    pub row: &'a [u8],
}

/// `POSITION <stream> <token>`
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Position<'a> {
    /// Stream name.
    pub stream: &'a str,
    /// Token.
    pub token: i64,
}

/// `start` or `end`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncState {
    /// `start`
    Start,
    /// `end`
    End,
}

/// `USER_SYNC <user_id> <start|end> <last_sync_ms>`
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UserSync<'a> {
    /// User id.
    pub user_id: &'a str,
    /// State.
    pub state: SyncState,
    /// Last sync time, ms.
    pub last_sync_ms: i64,
}

/// `FEDERATION_ACK <token>`
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FederationAck {
    /// Token.
    pub token: i64,
}

/// `REMOVE_PUSHER <app_id> <push_key> <user_id>`
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RemovePusher<'a> {
    /// App id.
    pub app_id: &'a str,
    /// Push key.
    pub push_key: &'a str,
    /// User id (the rest of the line).
    pub user_id: &'a str,
}

/// `INVALIDATE_CACHE <cache_func> <keys_json>`; the JSON is validated, not kept parsed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InvalidateCache<'a> {
    /// Cache function name.
    pub cache_func: &'a str,
    /// Keys JSON bytes.
    pub keys_json: &'a [u8],
}

/// `USER_IP <user_id> <json_array_5>`
#[derive(Clone, Debug, PartialEq)]
pub struct UserIp<'a> {
    /// User id.
    pub user_id: &'a str,
    /// The JSON array bytes as received.
    pub json: &'a [u8],
}

/// The argument of `REPLICATE`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplicateTarget<'a> {
    /// `ALL`
    All,
    /// A served stream.
    Stream(StreamId),
    /// Anything else (the whole argument).
    Unknown(&'a str),
}

/// Parses RDATA arguments.
pub fn parse_rdata(args: &[u8]) -> Result<Rdata<'_>, FieldError> {
    let _ = args;
    todo!()
}
