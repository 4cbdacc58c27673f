//! Lazy, typed field parsing for each command (PROTOCOL.md §2). Each `parse_*` takes the
//! argument bytes of a [`super::Line`] and borrows from them.
use super::error::FieldError;
use super::json;
use super::number::parse_i64;
use super::pyrepr::{py_exc, py_repr};
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
    /// The writer's instance name (Synapse 1.13 on; `None` in the seed's form).
    pub instance: Option<&'a str>,
    /// The token before this one (Synapse 1.22 on: `POSITION <s> <instance> <prev> <new>`).
    pub prev: Option<i64>,
    /// Token (the new one, from 1.22).
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
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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

impl Token {
    /// The token as a number, `None` for `batch`.
    pub const fn value(self) -> Option<i64> {
        match self {
            Self::Batch => None,
            Self::Value(v) => Some(v),
        }
    }
}

impl SyncState {
    /// The wire spelling: `start` or `end`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Start => "start",
            Self::End => "end",
        }
    }
}

impl<'a> ReplicateTarget<'a> {
    /// The target `REPLICATE <name>` names: `ALL` exactly, a served stream, or anything else.
    pub fn from_name(name: &'a str) -> Self {
        if name == "ALL" {
            Self::All
        } else if let Some(s) = StreamId::from_name(name.as_bytes()) {
            Self::Stream(s)
        } else {
            Self::Unknown(name)
        }
    }

    /// The argument as sent (`ALL`, the stream name, or the unknown text).
    pub fn as_str(&self) -> &'a str {
        match self {
            Self::All => "ALL",
            Self::Stream(s) => s.name(),
            Self::Unknown(s) => s,
        }
    }
}

/// Python's `args.split(" ", N - 1)` unpacked into exactly `N` names: only 0x20 separates,
/// consecutive spaces give empty fields, the last field keeps any further spaces, fewer fields
/// is `ValueError('not enough values to unpack (expected N, got M)')`.
#[inline]
pub fn split_fields<const N: usize>(args: &[u8]) -> Result<[&[u8]; N], FieldError> {
    let mut out: [&[u8]; N] = [&[]; N];
    let mut rest = args;
    for (i, slot) in out.iter_mut().enumerate() {
        if i + 1 == N {
            *slot = rest;
            return Ok(out);
        }
        match memchr::memchr(b' ', rest) {
            Some(sp) => {
                *slot = &rest[..sp];
                rest = &rest[sp + 1..];
            }
            None => return Err(not_enough_values(N, i + 1)),
        }
    }
    // N == 0: nothing to unpack.
    Ok(out)
}

/// `ValueError('not enough values to unpack (expected 3, got 2)')`
pub fn not_enough_values(expected: usize, got: usize) -> FieldError {
    FieldError(py_exc("ValueError", &format!("not enough values to unpack (expected {expected}, got {got})")))
}

/// A field as `&str`, or Python's `UnicodeDecodeError` for it.
#[inline]
pub fn utf8_field(field: &[u8]) -> Result<&str, FieldError> {
    std::str::from_utf8(field).map_err(|e| FieldError::unicode(field, &e))
}

/// Parses RDATA arguments: `<stream> <token|batch> <row_json>`. The row is not parsed (the
/// relay forwards it untouched); [`validate_rdata`] checks it where that is wanted.
#[inline]
pub fn parse_rdata(args: &[u8]) -> Result<Rdata<'_>, FieldError> {
    let [stream, token, row] = split_fields::<3>(args)?;
    let stream = utf8_field(stream)?;
    let token = if token == b"batch" { Token::Batch } else { Token::Value(parse_i64(token)?) };
    Ok(Rdata { stream, token, row })
}

/// Checks that an RDATA row is JSON (what Synapse's `json.loads` would accept), with the
/// `JSONDecodeError(...)` text on failure. Not used on the relay path.
pub fn validate_rdata(rdata: &Rdata<'_>) -> Result<(), FieldError> {
    json::validate(rdata.row).map_err(|e| FieldError(e.python_repr()))
}

/// Parses POSITION arguments: `<stream> <token>` (the token is the whole rest).
pub fn parse_position(args: &[u8]) -> Result<Position<'_>, FieldError> {
    let [stream, token] = split_fields::<2>(args)?;
    Ok(Position { stream: utf8_field(stream)?, instance: None, prev: None, token: parse_i64(token)? })
}

/// Parses USER_SYNC arguments: `<user_id> <start|end> <last_sync_ms>`.
pub fn parse_user_sync(args: &[u8]) -> Result<UserSync<'_>, FieldError> {
    let [user_id, state, ms] = split_fields::<3>(args)?;
    let user_id = utf8_field(user_id)?;
    let state = match state {
        b"start" => SyncState::Start,
        b"end" => SyncState::End,
        other => {
            let shown = py_repr(&String::from_utf8_lossy(other));
            return Err(FieldError(py_exc("Exception", &format!("Invalid USER_SYNC state {shown}"))));
        }
    };
    Ok(UserSync { user_id, state, last_sync_ms: parse_i64(ms)? })
}

/// Parses FEDERATION_ACK arguments: `<token>` (the whole rest).
pub fn parse_federation_ack(args: &[u8]) -> Result<FederationAck, FieldError> {
    Ok(FederationAck { token: parse_i64(args)? })
}

/// Parses REMOVE_PUSHER arguments: `<app_id> <push_key> <user_id>` (user id = the rest).
pub fn parse_remove_pusher(args: &[u8]) -> Result<RemovePusher<'_>, FieldError> {
    let [app_id, push_key, user_id] = split_fields::<3>(args)?;
    Ok(RemovePusher {
        app_id: utf8_field(app_id)?,
        push_key: utf8_field(push_key)?,
        user_id: utf8_field(user_id)?,
    })
}

/// Parses INVALIDATE_CACHE arguments: `<cache_func> <keys_json>`. The JSON is checked by
/// [`validate_invalidate_cache`], not here.
pub fn parse_invalidate_cache(args: &[u8]) -> Result<InvalidateCache<'_>, FieldError> {
    let [cache_func, keys_json] = split_fields::<2>(args)?;
    Ok(InvalidateCache { cache_func: utf8_field(cache_func)?, keys_json })
}

/// Checks INVALIDATE_CACHE's keys: any JSON value (Synapse only `json.loads` it).
pub fn validate_invalidate_cache(cmd: &InvalidateCache<'_>) -> Result<(), FieldError> {
    json::validate(cmd.keys_json).map_err(|e| FieldError(e.python_repr()))
}

/// Parses USER_IP arguments: `<user_id> <json_array_5>`. The JSON is checked by
/// [`validate_user_ip`], not here.
pub fn parse_user_ip(args: &[u8]) -> Result<UserIp<'_>, FieldError> {
    let [user_id, json] = split_fields::<2>(args)?;
    Ok(UserIp { user_id: utf8_field(user_id)?, json })
}

/// Checks USER_IP's JSON: it must parse, and unpack into exactly 5 values as Synapse's
/// `access_token, ip, user_agent, device_id, last_seen = json.loads(...)` does, with Python's
/// error texts. Python would also unpack an object of 5 keys or a string of 5 characters;
/// replhub requires an array (anything else is garbage that the master would store).
pub fn validate_user_ip(cmd: &UserIp<'_>) -> Result<(), FieldError> {
    let value = json::parse(cmd.json).map_err(|e| FieldError(e.python_repr()))?;
    let (count, is_array) = match &value {
        json::Value::Array(items) => (items.len(), true),
        // Unpacking a dict yields its keys; `parse` keeps one entry per key, as a dict does.
        json::Value::Object(members) => (members.len(), false),
        json::Value::String(s) => (s.chars().count(), false),
        json::Value::Null => return Err(not_iterable("NoneType")),
        json::Value::Bool(_) => return Err(not_iterable("bool")),
        json::Value::Number(json::Number::Int(_)) => return Err(not_iterable("int")),
        json::Value::Number(json::Number::Float(_)) => return Err(not_iterable("float")),
    };
    match count {
        5 if is_array => Ok(()),
        5 => Err(FieldError(py_exc("TypeError", "USER_IP data must be a JSON array of 5 values"))),
        n if n < 5 => Err(FieldError(py_exc(
            "ValueError",
            &format!("not enough values to unpack (expected 5, got {n})"),
        ))),
        _ => Err(FieldError(py_exc("ValueError", "too many values to unpack (expected 5)"))),
    }
}

/// `TypeError('cannot unpack non-iterable int object')`
fn not_iterable(python_type: &str) -> FieldError {
    FieldError(py_exc("TypeError", &format!("cannot unpack non-iterable {python_type} object")))
}

/// Parses REPLICATE's argument (the whole rest): `ALL` exactly, a served stream's name, or
/// anything else (the hub answers that with the unknown-stream ERROR).
pub fn parse_replicate(args: &[u8]) -> Result<ReplicateTarget<'_>, FieldError> {
    Ok(ReplicateTarget::from_name(utf8_field(args)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err<T: std::fmt::Debug>(r: Result<T, FieldError>) -> String {
        r.unwrap_err().0
    }

    #[test]
    fn split_like_python() {
        assert_eq!(split_fields::<3>(b"a b c d").unwrap(), [&b"a"[..], b"b", b"c d"]);
        assert_eq!(split_fields::<3>(b"a  b").unwrap(), [&b"a"[..], b"", b"b"]);
        assert_eq!(split_fields::<2>(b" ").unwrap(), [&b""[..], b""]);
        assert_eq!(split_fields::<1>(b"a b").unwrap(), [&b"a b"[..]]);
        assert_eq!(
            err(split_fields::<3>(b"a b")),
            "ValueError('not enough values to unpack (expected 3, got 2)')"
        );
        assert_eq!(
            err(split_fields::<2>(b"")),
            "ValueError('not enough values to unpack (expected 2, got 1)')"
        );
    }

    #[test]
    fn rdata() {
        let r = parse_rdata(b"events 101 [\"ev\", []]").unwrap();
        assert_eq!(r, Rdata { stream: "events", token: Token::Value(101), row: b"[\"ev\", []]" });
        let r = parse_rdata(b"caches batch  x y").unwrap();
        assert_eq!((r.token, r.row), (Token::Batch, &b" x y"[..]));
        assert_eq!(
            err(parse_rdata(b"caches BATCH []")),
            "ValueError(\"invalid literal for int() with base 10: 'BATCH'\")"
        );
        assert_eq!(
            err(parse_rdata(b"caches  5 []")),
            "ValueError(\"invalid literal for int() with base 10: ''\")"
        );
        assert_eq!(
            err(parse_rdata(b"events 5")),
            "ValueError('not enough values to unpack (expected 3, got 2)')"
        );
        assert!(err(parse_rdata(b"ev\xffents 5 []")).starts_with("UnicodeDecodeError('utf-8', "));
        // The row is not looked at.
        assert_eq!(parse_rdata(b"s 1 \xff").unwrap().row, b"\xff");
    }

    #[test]
    fn position() {
        assert_eq!(
            parse_position(b"events 5\r").unwrap(),
            Position { stream: "events", instance: None, prev: None, token: 5 }
        );
        assert_eq!(
            err(parse_position(b"events master 5")),
            "ValueError(\"invalid literal for int() with base 10: 'master 5'\")"
        );
        assert_eq!(
            err(parse_position(b"events")),
            "ValueError('not enough values to unpack (expected 2, got 1)')"
        );
    }

    #[test]
    fn user_sync() {
        let u = parse_user_sync(b"@a:hs start  15").unwrap();
        assert_eq!(u, UserSync { user_id: "@a:hs", state: SyncState::Start, last_sync_ms: 15 });
        assert_eq!(parse_user_sync(b"@a:hs end 1").unwrap().state, SyncState::End);
        assert_eq!(err(parse_user_sync(b"@a:hs stop 1")), "Exception(\"Invalid USER_SYNC state 'stop'\")");
        assert_eq!(
            err(parse_user_sync(b"@a:hs start soon")),
            "ValueError(\"invalid literal for int() with base 10: 'soon'\")"
        );
    }

    #[test]
    fn small_commands() {
        assert_eq!(parse_federation_ack(b"1234").unwrap(), FederationAck { token: 1234 });
        assert!(parse_federation_ack(b"").is_err());
        let p = parse_remove_pusher(b"m.http key with spaces @a:hs").unwrap();
        assert_eq!((p.app_id, p.push_key, p.user_id), ("m.http", "key", "with spaces @a:hs"));
        let c = parse_invalidate_cache(b"f [1, 2]").unwrap();
        assert_eq!((c.cache_func, c.keys_json), ("f", &b"[1, 2]"[..]));
        let u = parse_user_ip(b"@a:hs [1]").unwrap();
        assert_eq!((u.user_id, u.json), ("@a:hs", &b"[1]"[..]));
    }

    #[test]
    fn replicate() {
        assert_eq!(parse_replicate(b"ALL").unwrap(), ReplicateTarget::All);
        assert_eq!(parse_replicate(b"events").unwrap(), ReplicateTarget::Stream(StreamId::Events));
        assert_eq!(parse_replicate(b"all").unwrap(), ReplicateTarget::Unknown("all"));
        assert_eq!(parse_replicate(b"events 5").unwrap(), ReplicateTarget::Unknown("events 5"));
        assert_eq!(parse_replicate(b"").unwrap(), ReplicateTarget::Unknown(""));
        assert_eq!(ReplicateTarget::Stream(StreamId::Caches).as_str(), "caches");
    }

    #[test]
    fn json_validators() {
        let ic =
            |j: &'static [u8]| validate_invalidate_cache(&InvalidateCache { cache_func: "f", keys_json: j });
        assert!(ic(b"[\"@a:hs\"]").is_ok());
        assert!(ic(b"null").is_ok());
        assert_eq!(
            err(ic(b"[\"@a:example.com\"")),
            "JSONDecodeError(\"Expecting ',' delimiter or ']': line 1 column 18 (char 17)\")"
        );
        let ip = |j: &'static [u8]| validate_user_ip(&UserIp { user_id: "@a:hs", json: j });
        assert!(ip(b"[\"t\", \"1.2.3.4\", null, null, 1]").is_ok());
        assert_eq!(
            err(ip(b"[\"t\", \"1.2.3.4\", null, null]")),
            "ValueError('not enough values to unpack (expected 5, got 4)')"
        );
        assert_eq!(
            err(ip(b"{\"access_token\": \"tok\"}")),
            "ValueError('not enough values to unpack (expected 5, got 1)')"
        );
        assert_eq!(err(ip(b"[1, 2, 3, 4, 5, 6]")), "ValueError('too many values to unpack (expected 5)')");
        assert_eq!(err(ip(b"7")), "TypeError('cannot unpack non-iterable int object')");
        assert_eq!(err(ip(b"7.5")), "TypeError('cannot unpack non-iterable float object')");
        assert_eq!(err(ip(b"null")), "TypeError('cannot unpack non-iterable NoneType object')");
        assert!(err(ip(b"\"abcde\"")).starts_with("TypeError("));
        let rd = |j: &'static [u8]| validate_rdata(&Rdata { stream: "s", token: Token::Batch, row: j });
        assert!(rd(b"[\"f\", [NaN, Infinity, -Infinity], 1]").is_ok());
        assert!(rd(b"   [1]\r").is_ok());
        assert_eq!(
            err(rd(b"[\"f\", null, 1] x")),
            "JSONDecodeError('Extra data: line 1 column 16 - line 1 column 17 (char 15 - 16)')"
        );
    }
}
