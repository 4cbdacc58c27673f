//! The receive pipeline for one line, PROTOCOL.md §1.1 steps 4–8, with replhub's policies
//! (ARCHITECTURE.md §4): every case the reference "drops" gets a proper ERROR.
//!
//! * Step 4, strict UTF-8 of the whole line: failure is a parse error carrying Python's
//!   `UnicodeDecodeError(...)` (the reference drops the connection silently).
//! * Step 5, split at the first space: a one-word line is the command with *empty* arguments
//!   (`PING` is a ping; `USER_SYNC` alone fails to parse), where the reference drops.
//! * Step 6, direction check before any argument parsing: unknown and wrong-direction words
//!   (including the empty word of ` NAME x` or `   `) are [`PeerError::InvalidCommand`].
//! * Step 8, arguments: [`parse_args`]. JSON in INVALIDATE_CACHE and USER_IP is validated so a
//!   bad worker can never make the master drop replhub; an RDATA row is *not* parsed (relay
//!   path) unless [`parse_line_strict`] is used.
//!
//! Blank lines (step 3) never get here: [`super::LineSplitter`] skips them.
use super::command::{CommandWord, Role};
use super::error::{FieldError, PeerError};
use super::fields::{
    self, FederationAck, InvalidateCache, Position, Rdata, RemovePusher, ReplicateTarget, UserIp, UserSync,
};
use super::line::Line;

/// A parsed command, borrowing from its [`Line`].
#[derive(Clone, Debug, PartialEq)]
pub enum Parsed<'a> {
    /// `SERVER <server_name>`
    Server(&'a str),
    /// `RDATA <stream> <token|batch> <row_json>` (row unparsed)
    Rdata(Rdata<'a>),
    /// `POSITION <stream> <token>`
    Position(Position<'a>),
    /// `SYNC <data>`
    Sync(&'a str),
    /// `NAME <client_name>`
    Name(&'a str),
    /// `REPLICATE <stream|ALL>`
    Replicate(ReplicateTarget<'a>),
    /// `USER_SYNC <user_id> <start|end> <last_sync_ms>`
    UserSync(UserSync<'a>),
    /// `FEDERATION_ACK <token>`
    FederationAck(FederationAck),
    /// `REMOVE_PUSHER <app_id> <push_key> <user_id>`
    RemovePusher(RemovePusher<'a>),
    /// `INVALIDATE_CACHE <cache_func> <keys_json>` (JSON validated)
    InvalidateCache(InvalidateCache<'a>),
    /// `USER_IP <user_id> <json_array_5>` (JSON validated)
    UserIp(UserIp<'a>),
    /// `PING <data>`
    Ping(&'a str),
    /// `ERROR <text>`
    Error(&'a str),
    /// `REMOTE_SERVER_UP <server_name>`
    RemoteServerUp(&'a str),
    /// `CLEAR_USER_SYNC <instance_id>` (1.13+; not accepted by a seed peer)
    ClearUserSync(&'a str),
}

impl Parsed<'_> {
    /// The command word.
    pub const fn word(&self) -> CommandWord {
        match self {
            Self::Server(_) => CommandWord::Server,
            Self::Rdata(_) => CommandWord::Rdata,
            Self::Position(_) => CommandWord::Position,
            Self::Sync(_) => CommandWord::Sync,
            Self::Name(_) => CommandWord::Name,
            Self::Replicate(_) => CommandWord::Replicate,
            Self::UserSync(_) => CommandWord::UserSync,
            Self::FederationAck(_) => CommandWord::FederationAck,
            Self::RemovePusher(_) => CommandWord::RemovePusher,
            Self::InvalidateCache(_) => CommandWord::InvalidateCache,
            Self::UserIp(_) => CommandWord::UserIp,
            Self::Ping(_) => CommandWord::Ping,
            Self::Error(_) => CommandWord::Error,
            Self::RemoteServerUp(_) => CommandWord::RemoteServerUp,
            Self::ClearUserSync(_) => CommandWord::ClearUserSync,
        }
    }

    /// The same command for sending, e.g. to re-encode what was received.
    pub fn to_command(&self) -> super::Command<'_> {
        use super::Command as C;
        match self {
            Self::Server(s) => C::Server(s),
            Self::Rdata(r) => C::Rdata { stream: r.stream, token: r.token, row: r.row },
            Self::Position(p) => C::Position { stream: p.stream, token: p.token },
            Self::Sync(s) => C::Sync(s),
            Self::Name(s) => C::Name(s),
            Self::Replicate(t) => C::Replicate(t.as_str()),
            Self::UserSync(u) => {
                C::UserSync { user_id: u.user_id, state: u.state, last_sync_ms: u.last_sync_ms }
            }
            Self::FederationAck(a) => C::FederationAck(a.token),
            Self::RemovePusher(p) => {
                C::RemovePusher { app_id: p.app_id, push_key: p.push_key, user_id: p.user_id }
            }
            Self::InvalidateCache(c) => {
                C::InvalidateCache { cache_func: c.cache_func, keys_json: c.keys_json }
            }
            Self::UserIp(u) => C::UserIp { user_id: u.user_id, json: u.json },
            Self::Ping(s) => C::Ping(s),
            Self::Error(s) => C::Error(s),
            Self::RemoteServerUp(s) => C::RemoteServerUp(s),
            Self::ClearUserSync(s) => C::ClearUserSync(s),
        }
    }
}

/// Steps 4–6: strict UTF-8 of the whole line, then the command word and the direction check
/// for a peer in `role` (we are `role`; the line came from the other side).
pub fn check_command(role: Role, line: &Line) -> Result<CommandWord, PeerError> {
    if let Err(e) = std::str::from_utf8(line.as_bytes()) {
        return Err(PeerError::parse(line.word(), line.args(), FieldError::unicode(line.as_bytes(), &e)));
    }
    match line.command() {
        Some(word) if word.accepted_by(role) => Ok(word),
        // The line is valid UTF-8, so the word is too.
        _ => Err(PeerError::InvalidCommand(String::from_utf8_lossy(line.word()).into_owned())),
    }
}

/// Step 8: the arguments of `line` for `word` (which must be `line`'s command word, as
/// returned by [`check_command`]). INVALIDATE_CACHE and USER_IP JSON is validated; the RDATA
/// row is not.
pub fn parse_args(word: CommandWord, line: &Line) -> Result<Parsed<'_>, PeerError> {
    let args = line.args();
    parse_fields(word, args).map_err(|e| PeerError::parse(word.as_str().as_bytes(), args, e))
}

/// Steps 4–8 for one line: [`check_command`] then [`parse_args`].
pub fn parse_line(role: Role, line: &Line) -> Result<Parsed<'_>, PeerError> {
    let word = check_command(role, line)?;
    parse_args(word, line)
}

/// [`parse_line`], plus validation of an RDATA row as JSON (what a Synapse client does with
/// `json.loads`). For a client that decodes rows (`tail --decode`, the client library); the
/// hub's relay path uses [`parse_line`] and forwards rows untouched.
pub fn parse_line_strict(role: Role, line: &Line) -> Result<Parsed<'_>, PeerError> {
    let parsed = parse_line(role, line)?;
    if let Parsed::Rdata(r) = &parsed {
        fields::validate_rdata(r).map_err(|e| PeerError::parse(b"RDATA", line.args(), e))?;
    }
    Ok(parsed)
}

fn parse_fields(word: CommandWord, args: &[u8]) -> Result<Parsed<'_>, FieldError> {
    let text = fields::utf8_field;
    Ok(match word {
        CommandWord::Rdata => Parsed::Rdata(fields::parse_rdata(args)?),
        CommandWord::Position => Parsed::Position(fields::parse_position(args)?),
        CommandWord::Replicate => Parsed::Replicate(fields::parse_replicate(args)?),
        CommandWord::UserSync => Parsed::UserSync(fields::parse_user_sync(args)?),
        CommandWord::FederationAck => Parsed::FederationAck(fields::parse_federation_ack(args)?),
        CommandWord::RemovePusher => Parsed::RemovePusher(fields::parse_remove_pusher(args)?),
        CommandWord::InvalidateCache => {
            let cmd = fields::parse_invalidate_cache(args)?;
            fields::validate_invalidate_cache(&cmd)?;
            Parsed::InvalidateCache(cmd)
        }
        CommandWord::UserIp => {
            let cmd = fields::parse_user_ip(args)?;
            fields::validate_user_ip(&cmd)?;
            Parsed::UserIp(cmd)
        }
        CommandWord::Server => Parsed::Server(text(args)?),
        CommandWord::Sync => Parsed::Sync(text(args)?),
        CommandWord::Name => Parsed::Name(text(args)?),
        CommandWord::Ping => Parsed::Ping(text(args)?),
        CommandWord::Error => Parsed::Error(text(args)?),
        CommandWord::RemoteServerUp => Parsed::RemoteServerUp(text(args)?),
        CommandWord::ClearUserSync => Parsed::ClearUserSync(text(args)?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{StreamId, Token};

    fn line(s: &'static [u8]) -> Line {
        Line::new(bytes::Bytes::from_static(s))
    }

    fn error_text(role: Role, s: &'static [u8]) -> String {
        parse_line(role, &line(s)).unwrap_err().to_string()
    }

    #[test]
    fn direction_check_comes_first() {
        assert_eq!(error_text(Role::Server, b"RDATA garbage"), "invalid command: RDATA");
        assert_eq!(error_text(Role::Server, b"SERVER x"), "invalid command: SERVER");
        assert_eq!(error_text(Role::Client, b"NAME x"), "invalid command: NAME");
        assert_eq!(error_text(Role::Client, b"REPLICATE ALL"), "invalid command: REPLICATE");
        assert_eq!(error_text(Role::Server, b"name worker1"), "invalid command: name");
        assert_eq!(error_text(Role::Server, b"FOO"), "invalid command: FOO");
        assert_eq!(error_text(Role::Server, b" NAME x"), "invalid command: ");
        assert_eq!(error_text(Role::Server, b"   "), "invalid command: ");
        assert_eq!(error_text(Role::Server, b"CLEAR_USER_SYNC abc"), "invalid command: CLEAR_USER_SYNC");
    }

    #[test]
    fn one_word_lines_have_empty_arguments() {
        assert_eq!(parse_line(Role::Server, &line(b"PING")), Ok(Parsed::Ping("")));
        assert_eq!(
            parse_line(Role::Server, &line(b"REPLICATE")),
            Ok(Parsed::Replicate(ReplicateTarget::Unknown("")))
        );
        assert_eq!(
            error_text(Role::Server, b"USER_SYNC"),
            "failed to parse line for  'USER_SYNC': ValueError('not enough values to unpack (expected 3, got 1)') (''):"
        );
    }

    #[test]
    fn invalid_utf8_is_a_parse_error() {
        let e = error_text(Role::Server, b"NAME \xff\xfe");
        assert_eq!(
            e,
            "failed to parse line for  'NAME': UnicodeDecodeError('utf-8', b'NAME \\xff\\xfe', 5, 6, 'invalid start byte') ('\u{fffd}\u{fffd}'):"
        );
        // Even in an unknown word: decoding comes before the lookup, as in the reference.
        assert!(error_text(Role::Server, b"F\xffO x")
            .starts_with("failed to parse line for  'F\u{fffd}O': UnicodeDecodeError("));
    }

    #[test]
    fn parses_every_inbound_word() {
        macro_rules! s {
            ($b:expr) => {
                parse_line(Role::Server, &line($b)).unwrap_or_else(|e| panic!("{e}"))
            };
        }
        macro_rules! c {
            ($b:expr) => {
                parse_line(Role::Client, &line($b)).unwrap_or_else(|e| panic!("{e}"))
            };
        }
        assert_eq!(c!(b"SERVER example.com"), Parsed::Server("example.com"));
        assert_eq!(
            c!(b"RDATA events batch [1]"),
            Parsed::Rdata(Rdata { stream: "events", token: Token::Batch, row: b"[1]" })
        );
        assert_eq!(c!(b"POSITION events 5\r"), Parsed::Position(Position { stream: "events", token: 5 }));
        assert_eq!(c!(b"SYNC abc"), Parsed::Sync("abc"));
        assert_eq!(c!(b"PING 123\r"), Parsed::Ping("123\r"));
        assert_eq!(c!(b"ERROR x y"), Parsed::Error("x y"));
        assert_eq!(c!(b"REMOTE_SERVER_UP r"), Parsed::RemoteServerUp("r"));
        assert_eq!(s!(b"NAME "), Parsed::Name(""));
        assert_eq!(s!(b"REPLICATE events"), Parsed::Replicate(ReplicateTarget::Stream(StreamId::Events)));
        assert!(matches!(s!(b"USER_SYNC @a:hs start 1"), Parsed::UserSync(_)));
        assert_eq!(s!(b"FEDERATION_ACK 12"), Parsed::FederationAck(FederationAck { token: 12 }));
        assert!(matches!(s!(b"REMOVE_PUSHER a k @u:hs"), Parsed::RemovePusher(_)));
        assert!(matches!(s!(b"INVALIDATE_CACHE f [\"k\"]"), Parsed::InvalidateCache(_)));
        assert!(matches!(s!(b"USER_IP @a:hs [\"t\", \"ip\", null, null, 1]"), Parsed::UserIp(_)));
        assert_eq!(s!(b"REMOTE_SERVER_UP r"), Parsed::RemoteServerUp("r"));
    }

    #[test]
    fn json_is_checked_where_required() {
        assert!(error_text(Role::Server, b"INVALIDATE_CACHE f [")
            .starts_with("failed to parse line for  'INVALIDATE_CACHE': JSONDecodeError("));
        assert!(error_text(Role::Server, b"USER_IP @a:hs [1, 2]")
            .starts_with("failed to parse line for  'USER_IP': ValueError('not enough values to unpack (expected 5, got 2)')"));
        // `%` is harmless here (the reference drops the connection).
        assert!(error_text(Role::Server, b"INVALIDATE_CACHE f 100%").ends_with(" ('f 100%'):"));
        // Relay path: RDATA rows are not parsed; strict mode parses them.
        let bad = line(b"RDATA caches 5 [\"f\", null, 1");
        assert!(parse_line(Role::Client, &bad).is_ok());
        assert!(parse_line_strict(Role::Client, &bad)
            .unwrap_err()
            .to_string()
            .starts_with("failed to parse line for  'RDATA': JSONDecodeError("));
    }

    #[test]
    fn re_encodes_to_the_same_line() {
        for (role, l) in [
            (Role::Client, &b"RDATA events 101 [\"ev\", []]"[..]),
            (Role::Client, b"POSITION events 5"),
            (Role::Server, b"USER_SYNC @a:hs end 15"),
            (Role::Server, b"REPLICATE ALL"),
            (Role::Server, b"REPLICATE events 5"),
            (Role::Server, b"PING "),
        ] {
            let l = Line::new(bytes::Bytes::from_static(l));
            let parsed = parse_line(role, &l).unwrap();
            let mut want = l.as_bytes().to_vec();
            want.push(b'\n');
            assert_eq!(parsed.to_command().to_bytes().unwrap(), want);
            assert_eq!(parsed.word(), parsed.to_command().word());
        }
    }
}
